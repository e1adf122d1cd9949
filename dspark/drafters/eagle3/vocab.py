"""Pruned draft vocabulary for Eagle3: the most frequent supervised tokens of the training data.

Legend: V target vocab, W draft vocab.

The maps use the SGLang/vLLM Eagle3 convention: ``d2t [W]`` int64 *offsets* (target id = draft id + d2t[draft
id]) and ``t2d [V]`` bool (True where the target id is in the draft vocab). Draft ids follow ascending target
ids, so the offsets are non-negative and non-decreasing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def build_draft_vocab(token_counts_V: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d2t [W] int64, t2d [V] bool)`` keeping the ``draft_vocab_size`` most counted tokens.

    Ties are broken by the lower target id, so the result is deterministic for given counts.
    """
    counts_V = torch.as_tensor(token_counts_V).flatten()
    V = counts_V.numel()
    if not 1 <= draft_vocab_size <= V:
        raise ValueError(f"draft_vocab_size must be within 1..{V} (the target vocab size), got {draft_vocab_size}")
    # Stable sort on -count keeps ascending ids among equal counts.
    order_V = torch.sort(-counts_V.double(), stable=True).indices
    target_ids_W = order_V[:draft_vocab_size].sort().values
    d2t_W = target_ids_W - torch.arange(draft_vocab_size)
    t2d_V = torch.zeros(V, dtype=torch.bool)
    t2d_V[target_ids_W] = True
    return d2t_W.long(), t2d_V


def draft_to_target_ids(d2t_W: torch.Tensor) -> torch.Tensor:
    """Target id of every draft id (``draft id + d2t``)."""
    return torch.arange(d2t_W.numel(), device=d2t_W.device) + d2t_W


def count_supervised_tokens(samples: Iterable[dict], vocab_size: int) -> torch.Tensor:
    """Occurrences ``[V]`` (int64) of every supervised token in ``samples``.

    A sample is a dict with ``input_ids`` and ``loss_mask`` (a cache sample, or a conversation as
    ``dspark.data.chat.conversation_ids`` returns it, lists or tensors). Only supervised tokens count: they are
    what the drafter is asked to predict.
    """
    counts_V = torch.zeros(vocab_size, dtype=torch.long)
    for i, sample in enumerate(samples):
        ids_T = torch.as_tensor(sample["input_ids"], dtype=torch.long).flatten()
        mask_T = torch.as_tensor(sample["loss_mask"]).flatten().bool()
        if ids_T.shape != mask_T.shape:
            raise ValueError(f"sample {i}: input_ids has {ids_T.numel()} tokens but loss_mask {mask_T.numel()}")
        picked = ids_T[mask_T]
        if picked.numel() and not 0 <= int(picked.min()) <= int(picked.max()) < vocab_size:
            raise ValueError(f"sample {i}: token ids outside the vocabulary [0, {vocab_size})")
        counts_V += torch.bincount(picked, minlength=vocab_size)
    return counts_V
