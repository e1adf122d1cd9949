"""Shared pieces of the export round-trip tests: drafters moved off their initialisation, and a fixed batch."""

from __future__ import annotations

import torch


def perturbed(drafter):
    """``drafter`` with every parameter nudged away from its initialisation (so zero-initialised heads matter)."""
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return drafter


def random_batch(vocab: int, hidden: int, num_layers: int, tokens: int = 20) -> dict[str, torch.Tensor]:
    """A fixed two-row training batch with every token supervised."""
    g = torch.Generator().manual_seed(0)
    return {"input_ids_BT": torch.randint(0, vocab, (2, tokens), generator=g),
            "loss_mask_BT": torch.ones(2, tokens, dtype=torch.bool),
            "features_BTLH": torch.randn(2, tokens, num_layers, hidden, generator=g),
            "final_BTH": torch.randn(2, tokens, hidden, generator=g)}
