"""Test helpers: tiny DSpark/DFlash drafters (H=64, V=300, random frozen weights) and training batches."""

from __future__ import annotations

import torch

from dspark.config import drafter_config
from dspark.drafters import build_drafter

V, H = 300, 64
TINY_TARGET = dict(hidden_size=H, vocab_size=V, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=96, num_hidden_layers=6, rms_norm_eps=1e-6,
                   rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, max_position_embeddings=512)
LAYER_IDS = [0, 2, 4]


def make_drafter(seed: int = 0, **overrides):
    """A drafter with every trainable tensor random (including the zero-initialised Markov W2) so all paths matter.
    ``overrides`` are ``drafter`` fields as a recipe writes them (``dspark={...}`` merges into the Markov rank 16)."""
    torch.manual_seed(seed)
    embed = torch.randn(V, H)
    lm_head = torch.randn(V, H) / H**0.5
    data = {"num_layers": 2, "num_anchors": 6, **overrides}
    if data.get("algorithm", "dspark") == "dspark":
        data["dspark"] = {"markov_rank": 16, **overrides.get("dspark", {})}
    cfg = drafter_config(data)
    drafter = build_drafter(cfg, TINY_TARGET, LAYER_IDS, embed, lm_head)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return drafter


def make_batch(seed: int = 1, B: int = 2, T: int = 24):
    """Right-padded batch: row 0 supervised after a 4-token prompt with a hole at 14; row 1 padded after 17."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 4:] = True
    mask[0, 14] = False
    mask[1, 3:17] = True
    return {
        "input_ids_BT": torch.randint(0, V, (B, T), generator=g),
        "loss_mask_BT": mask,
        "features_BTLH": torch.randn(B, T, len(LAYER_IDS), H, generator=g),
        "final_BTH": torch.randn(B, T, H, generator=g) * 3,
    }
