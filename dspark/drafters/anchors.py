"""Anchor sampling and block labels for parallel-drafter training (DESIGN section 4, "Training blocks").

Legend: B batch, T tokens, A anchors per sequence, K block size (number of predicted tokens).

An anchor ``a`` is a position whose token and next token are both supervised (``loss_mask[a]`` and
``loss_mask[a + 1]``). Prediction slot ``j`` (0-based) of the block at ``a`` is labelled with token ``a + j + 1``.
Only the contiguous prefix of slots whose labels are supervised and inside the sequence is trained: a block
that runs into padding or a non-assistant token stops there, even if later labels are supervised again.
"""

from __future__ import annotations

import math

import torch


def sample_anchors(loss_mask_BT: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to ``num_anchors`` distinct anchors per sequence, uniformly among the candidates.

    Returns ``anchor_pos_BA`` (long, ascending among the valid ones) and ``anchor_valid_BA`` (bool). ``A`` is
    ``min(num_anchors, most candidates in any sequence)`` (at least 1); rows with fewer candidates are padded
    with invalid anchors at position 0. Deterministic for a given ``generator`` state.
    """
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    mask_BT = loss_mask_BT.bool()
    B, T = mask_BT.shape
    if T < 2:
        zeros = torch.zeros(B, 1, dtype=torch.long, device=mask_BT.device)
        return zeros, zeros.bool()
    candidate_BC = mask_BT[:, :-1] & mask_BT[:, 1:]  # C = T - 1 candidate positions
    num = max(1, min(num_anchors, int(candidate_BC.sum(dim=1).max())))
    # Random keys in [0, 1) for candidates, -1 elsewhere; the top keys are a uniform sample without replacement.
    rng_device = generator.device if generator is not None else mask_BT.device
    keys_BC = torch.rand(B, T - 1, generator=generator, device=rng_device).to(mask_BT.device)
    keys_BC = torch.where(candidate_BC, keys_BC, torch.full_like(keys_BC, -1.0))
    top_keys_BA, pos_BA = keys_BC.topk(num, dim=1)
    valid_BA = top_keys_BA >= 0
    # Sort the valid anchors by position (invalid ones last) for memory locality and readable debugging.
    order_key_BA = torch.where(valid_BA, pos_BA, torch.full_like(pos_BA, T))
    order_BA = order_key_BA.argsort(dim=1)
    pos_BA = pos_BA.gather(1, order_BA)
    valid_BA = valid_BA.gather(1, order_BA)
    return torch.where(valid_BA, pos_BA, torch.zeros_like(pos_BA)), valid_BA


def block_labels(input_ids_BT: torch.Tensor, loss_mask_BT: torch.Tensor, anchor_pos_BA: torch.Tensor,
                 anchor_valid_BA: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``[B, A, K]`` (token ``a + j + 1``; 0 where out of range) and the valid-prefix mask ``[B, A, K]``."""
    B, T = input_ids_BT.shape
    offsets_K = torch.arange(1, block_size + 1, device=input_ids_BT.device)
    label_pos_BAK = anchor_pos_BA.unsqueeze(-1) + offsets_K
    in_range_BAK = label_pos_BAK < T
    safe_pos_BAK = label_pos_BAK.clamp(max=T - 1).view(B, -1)
    labels_BAK = input_ids_BT.gather(1, safe_pos_BAK).view_as(label_pos_BAK)
    supervised_BAK = loss_mask_BT.bool().gather(1, safe_pos_BAK).view_as(label_pos_BAK)
    ok_BAK = in_range_BAK & supervised_BAK & anchor_valid_BA.unsqueeze(-1)
    # Contiguous prefix: a slot counts only if every earlier slot of its block counts too.
    valid_BAK = ok_BAK.long().cumprod(dim=-1).bool()
    labels_BAK = torch.where(in_range_BAK, labels_BAK, torch.zeros_like(labels_BAK))
    return labels_BAK, valid_BAK


def position_weights(block_size: int, decay: float, device=None) -> torch.Tensor:
    """``w_k = exp(-(k - 1) / decay)`` for k = 1..K (fp32 ``[K]``)."""
    if decay <= 0 or not math.isfinite(decay):
        raise ValueError(f"loss_decay must be a positive number, got {decay}")
    return torch.exp(-torch.arange(block_size, dtype=torch.float32, device=device) / decay)
