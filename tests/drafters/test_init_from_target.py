"""``drafter.init_from_target`` for DSpark/DFlash: the draft layers start as copies of the target's deepest feature
layers, read from its checkpoint; the trainer's hook finds the checkpoint (a GGUF target: its dequantised copy);
what cannot be copied is refused in one line."""

from __future__ import annotations

import pytest
import torch

from dspark.config import ConfigError, DrafterConfig, DSparkConfig, RunConfig, TargetConfig
from dspark.drafters import build_drafter
from dspark.targets.hf import safetensors_dir
from dspark.targets.weights import WeightIndex


def _drafter(target_dir, layer_ids, **cfg):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(target_dir)
    index = WeightIndex(target_dir)
    embed = index.load("model.embed_tokens.weight", torch.float32)
    torch.manual_seed(0)
    return build_drafter(DrafterConfig(**cfg), config, layer_ids, embed, embed.clone())


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_draft_layers_become_the_targets_deepest_feature_layers(family, tiny_qwen3_dir, tiny_llama_dir):
    target_dir = tiny_qwen3_dir if family == "qwen3" else tiny_llama_dir
    drafter = _drafter(target_dir, [0, 1, 2], num_layers=2, block_size=4)
    assert drafter.target_layers_to_copy() == [1, 2]
    untouched = {n: p.clone() for n, p in drafter.named_parameters()}
    copied = drafter.init_from_target(target_dir)
    index = WeightIndex(target_dir)
    for s, source in enumerate([1, 2]):
        for name, tensor in drafter.layers[s].state_dict().items():
            stored = f"model.layers.{source}.{name}"
            if stored in index:
                torch.testing.assert_close(tensor, index.load(stored, torch.float32), rtol=0, atol=0)
                assert f"layers.{s}.{name}" in copied
            else:  # Llama has no q/k norms: Qwen3's draft layer keeps its own
                assert family == "llama" and name.endswith(("q_norm.weight", "k_norm.weight"))
                torch.testing.assert_close(tensor, untouched[f"layers.{s}.{name}"], rtol=0, atol=0)
    expected = sum(len(layer.state_dict()) for layer in drafter.layers) - (4 if family == "llama" else 0)
    assert len(copied) == expected
    # Everything outside the draft layers keeps its initialisation.
    for name, param in drafter.named_parameters():
        if not name.startswith("layers."):
            torch.testing.assert_close(param, untouched[name], rtol=0, atol=0)
    # More draft layers than feature ids: the deepest id repeats.
    assert _drafter(target_dir, [0, 2], num_layers=3).target_layers_to_copy() == [0, 2, 2]


def test_the_trainer_hook_copies_through_the_checkpoint_of_the_target(tiny_qwen3_dir):
    from dspark.train.drafter_hooks import prepare_drafter

    cfg = RunConfig(target=TargetConfig(name_or_path=str(tiny_qwen3_dir), layer_ids=[0, 2]),
                    drafter=DrafterConfig(block_size=4, init_from_target=True, dspark=DSparkConfig(markov_rank=8)))
    drafter = _drafter(tiny_qwen3_dir, [0, 2], block_size=4)
    prepare_drafter(drafter, cfg, world=1)
    torch.testing.assert_close(drafter.layers[0].mlp.up_proj.weight,
                               WeightIndex(tiny_qwen3_dir).load("model.layers.2.mlp.up_proj.weight", torch.float32))
    assert safetensors_dir(str(tiny_qwen3_dir)) == tiny_qwen3_dir


def test_what_cannot_be_copied_is_refused_in_one_line(tiny_qwen3_dir, tmp_path):
    narrow = _drafter(tiny_qwen3_dir, [2], intermediate_size=64)  # the target's MLP is 128 wide
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.gate_proj.weight has shape \(128, 64\).*expects "
                                         r"\(64, 64\)"):
        narrow.init_from_target(tiny_qwen3_dir)
    eagle3 = _drafter(tiny_qwen3_dir, [0, 1, 2], algorithm="eagle3")
    with pytest.raises(ValueError, match="drafter 'eagle3' has no target layers to copy"):
        eagle3.init_from_target(tiny_qwen3_dir)
    with pytest.raises(ConfigError, match="eagle3's layer takes .embedding ; hidden. and has no target counterpart"):
        DrafterConfig(algorithm="eagle3", init_from_target=True)
    with pytest.raises(ValueError, match="does not exist"):
        safetensors_dir(str(tmp_path / "missing"))
