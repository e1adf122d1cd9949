"""The DeepSeek-V4 DSpark recipes read the target's last layers (V4-Flash 40-42 of 43, V4-Pro 58-60 of 61): their
layer ids pass the backend's check against the real layer counts. Config only, no weights."""

import dataclasses

import pytest
from transformers import AutoConfig

from dspark.config import load_config
from dspark.targets import load_target

# V4-Flash is transformers' DeepseekV4Config default; V4-Pro's published config differs in these fields (the same
# as tools/size_targets.py; V4_DSPARK.md section 2).
V4_CONFIGS = {
    "deepseek_v4_flash_dspark": {},
    "deepseek_v4_pro_dspark": {"hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
                               "q_lora_rank": 1536, "o_groups": 16, "o_lora_rank": 1024, "n_routed_experts": 384,
                               "moe_intermediate_size": 3072},
}


@pytest.mark.parametrize("recipe", sorted(V4_CONFIGS))
def test_v4_recipe_layer_ids_pass_the_check_against_the_real_layer_count(recipe, tmp_path):
    cfg = load_config(recipe)
    config = AutoConfig.for_model("deepseek_v4", **V4_CONFIGS[recipe])
    num_layers = config.num_hidden_layers
    assert cfg.target.layer_ids == [num_layers - 3, num_layers - 2, num_layers - 1]  # ends at the last layer
    config.save_pretrained(tmp_path)
    target_cfg = dataclasses.replace(cfg.target, name_or_path=str(tmp_path))
    # The recipe's backend checks the layer ids against config.json, then looks for the weights (none here).
    with pytest.raises(FileNotFoundError, match="has neither"):
        load_target(target_cfg)
    with pytest.raises(ValueError, match=rf"layer_ids \[{num_layers}\] out of range .* valid ids are "
                                         rf"-1..{num_layers - 1}"):
        load_target(dataclasses.replace(target_cfg, layer_ids=[num_layers - 1, num_layers]))
