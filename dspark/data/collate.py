"""Collate cache samples into the right-padded training batch described in ``dspark/drafters/base.py``.

Legend: B batch, T tokens (padded length), L feature layers, H hidden size.
"""

from __future__ import annotations

import torch

SAMPLE_KEYS = ("input_ids", "loss_mask", "features_TLH", "final_TH")


def collate(samples: list[dict], max_seq_len: int) -> dict[str, torch.Tensor]:
    """Stack samples (``input_ids`` [T], ``loss_mask`` [T], ``features_TLH`` [T,L,H], ``final_TH`` [T,H]).

    Each sample is truncated to ``max_seq_len`` tokens and right-padded to the longest one; padding has token
    id 0, zero features and ``loss_mask`` False, so it is never supervised (and, sitting after every real
    token, never part of a causal context). Features come out as float32 whatever the cache stored.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    L, H = _check_samples(samples)
    lengths = [min(s["input_ids"].shape[0], max_seq_len) for s in samples]
    B, T = len(samples), max(lengths)
    input_ids_BT = torch.zeros(B, T, dtype=torch.long)
    loss_mask_BT = torch.zeros(B, T, dtype=torch.bool)
    features_BTLH = torch.zeros(B, T, L, H, dtype=torch.float32)
    final_BTH = torch.zeros(B, T, H, dtype=torch.float32)
    for b, (sample, n) in enumerate(zip(samples, lengths)):
        input_ids_BT[b, :n] = sample["input_ids"][:n]
        loss_mask_BT[b, :n] = sample["loss_mask"][:n].bool()
        features_BTLH[b, :n] = sample["features_TLH"][:n]
        final_BTH[b, :n] = sample["final_TH"][:n]
    return {"input_ids_BT": input_ids_BT, "loss_mask_BT": loss_mask_BT, "features_BTLH": features_BTLH,
            "final_BTH": final_BTH}


def _check_samples(samples: list[dict]) -> tuple[int, int]:
    """Every sample has the four keys, one token count, and sample 0's L and H; returns (L, H)."""
    for i, sample in enumerate(samples):
        missing = [k for k in SAMPLE_KEYS if k not in sample]
        if missing:
            raise ValueError(f"sample {i} lacks {', '.join(missing)} "
                             f"(a training sample needs {', '.join(SAMPLE_KEYS)})")
        num_tokens = sample["input_ids"].shape[0]
        counts = (sample["loss_mask"].shape, sample["features_TLH"].shape[:1], sample["final_TH"].shape[:1])
        if any(tuple(c) != (num_tokens,) for c in counts):
            raise ValueError(
                f"sample {i}: token counts disagree: input_ids {tuple(sample['input_ids'].shape)}, loss_mask "
                f"{tuple(sample['loss_mask'].shape)}, features_TLH {tuple(sample['features_TLH'].shape)}, "
                f"final_TH {tuple(sample['final_TH'].shape)}"
            )
    _, L, H = samples[0]["features_TLH"].shape
    for i, sample in enumerate(samples):
        if sample["features_TLH"].shape[1:] != (L, H) or sample["final_TH"].shape[1:] != (H,):
            raise ValueError(
                f"sample {i}: features_TLH {tuple(sample['features_TLH'].shape)} / final_TH "
                f"{tuple(sample['final_TH'].shape)} do not match sample 0's [T, {L}, {H}] / [T, {H}]"
            )
    return L, H
