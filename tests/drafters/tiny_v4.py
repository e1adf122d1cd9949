"""A tiny DeepSeek-V4 config and dspark_v4 drafter for the drafter, export and training tests."""

from __future__ import annotations

import torch

from dspark.config import drafter_config
from dspark.drafters import build_drafter

V = 256


def v4_config(**updates):
    """A tiny DeepSeek-V4 config (hidden 64, 2 mHC streams, 4 experts top-2, window 8)."""
    from transformers import AutoConfig

    fields = dict(vocab_size=V, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=32, q_lora_rank=32, partial_rotary_factor=0.25,
                  n_routed_experts=4, num_experts_per_tok=2, hc_mult=2, hc_sinkhorn_iters=3, sliding_window=8,
                  o_groups=2, o_lora_rank=16, layer_types=["sliding_attention"] * 4, mlp_layer_types=["moe"] * 4,
                  max_position_embeddings=512)
    return AutoConfig.for_model("deepseek_v4", **{**fields, **updates})


def make_drafter(config=None, seed: int = 0, **cfg):
    """``cfg``: ``drafter`` fields as a recipe writes them (e.g. ``v4={"moe_bias_update_rate": 0.5}``)."""
    config = config or v4_config()
    torch.manual_seed(seed)
    embed, head = torch.randn(V, 64), torch.randn(V, 64) * 0.2
    drafter_cfg = drafter_config({"algorithm": "dspark_v4", "num_layers": 3, "block_size": 5, "num_anchors": 6,
                                  "dspark": {"markov_rank": 16}, **cfg})
    drafter = build_drafter(drafter_cfg, config, [0, 1, 3], embed, head)
    with torch.no_grad():  # untrained biases, sinks and Markov W2 are zero: give every path a real value
        for name, p in drafter.named_parameters():
            if name.endswith(("sinks", "base", "markov_w2.weight", "hc_base")):
                p.normal_(std=0.3)
        for stage in drafter.stages:
            stage.mlp.gate.e_score_correction_bias.normal_(std=0.1)
    return drafter


def features(B: int, T: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids_BT": torch.randint(0, V, (B, T), generator=g),
            "loss_mask_BT": torch.ones(B, T, dtype=torch.bool),
            "features_BTLH": torch.randn(B, T, 3, 64, generator=g),  # the mean of the mHC streams, as targets give
            "final_BTH": torch.randn(B, T, 64, generator=g)}
