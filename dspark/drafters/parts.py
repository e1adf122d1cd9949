"""What the drafters share besides layers: the frozen target matrices, the checks of their constructor and proposal
arguments, the decoding-time prefix cache and the slot-by-slot draft of a sequential head.

Legend: B rows, K slots, R head rank, T context rows, V vocab, H hidden size.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dspark.drafters.base import Proposal, sample_rows
from dspark.drafters.common import config_get


class FrozenWeight(nn.Module):
    """A frozen target matrix (``[V, H]`` embedding or LM head) as a non-persistent buffer named ``weight``: never
    trained, never sharded, never in training checkpoints (``full_state_dict`` and the exporters add it back)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach(), persistent=False)


def check_target_matrix(name: str, weight: torch.Tensor, vocab_size: int, hidden_size: int) -> None:
    """Refuse a target embedding / LM head that is not ``[vocab_size, hidden_size]``."""
    if tuple(weight.shape) != (vocab_size, hidden_size):
        raise ValueError(f"target {name} has shape {tuple(weight.shape)}, expected [vocab_size, hidden_size] = "
                         f"[{vocab_size}, {hidden_size}] from the target config")


def num_target_layers(target_config) -> int:
    """Decoder layers of the target: ``num_target_layers`` of an exported drafter config, else the HF field."""
    return config_get(target_config, "num_target_layers") or config_get(target_config, "num_hidden_layers")


def check_layer_ids(layer_ids, num_target: int) -> list[int]:
    """The feature layer ids as a list: strictly increasing within -1..num_target - 2 (the last layer's output is
    the final hidden state, which the drafter gets anyway)."""
    ids = list(layer_ids)
    if not ids or any(b <= a for a, b in itertools.pairwise(ids)) or ids[0] < -1 or ids[-1] >= num_target - 1:
        raise ValueError(f"layer_ids {ids} must be strictly increasing within -1..{num_target - 2} "
                         f"(the target has {num_target} layers; the last one is excluded)")
    return ids


def check_proposal_rows(contexts: list, anchor_ids: list, generators: list, temperature: float) -> None:
    """Refuse a ``propose_batch`` call without one context, anchor and generator per row (at least one row), or
    with a negative temperature."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not len(contexts) == len(anchor_ids) == len(generators) or not contexts:
        raise ValueError(f"propose_batch got {len(contexts)} contexts, {len(anchor_ids)} anchors and "
                         f"{len(generators)} generators; expected one of each per row (at least one row)")


class PrefixCache:
    """Per-row values a drafter computed over the leading rows of each context in its previous ``propose_batch``
    call, so the next call computes only the rows past the longest prefix it shares (decoding extends each context
    by the accepted tokens every round).

    A row is keyed by tensors whose first dim runs over the context rows (the features, and the token ids where the
    values depend on them), compared exactly. ``version`` is what the values also depend on (the weights' versions
    and storage): a different one empties the cache, so training between calls invalidates it.
    """

    def __init__(self):
        self.version: Any = None
        self.rows: list[tuple[tuple[torch.Tensor, ...], Any]] = []

    def longest_prefix(self, version: Any, keys: tuple[torch.Tensor, ...], limit: int) -> tuple[int, Any]:
        """``(n, value)`` of the cached row whose keys share the most leading rows (at most ``limit``) with
        ``keys``; ``(0, None)`` when none does or ``version`` differs from the stored one."""
        best, best_value = 0, None
        if version != self.version:
            return best, best_value
        first = keys[0]
        for prev_keys, value in self.rows:
            prev = prev_keys[0]
            n = min(prev.shape[0], limit)
            # The last shared row depends on the whole prefix in a real context: a cheap filter before the full check.
            if (n > best and prev.dtype == first.dtype and prev.device == first.device
                    and torch.equal(prev[n - 1], first[n - 1])
                    and all(torch.equal(p[:n], k[:n]) for p, k in zip(prev_keys, keys))):
                best, best_value = n, value
        return best, best_value

    def store(self, version: Any, rows: list[tuple[tuple[torch.Tensor, ...], Any]]) -> None:
        """Keep this call's rows (replacing the previous call's)."""
        self.version, self.rows = version, rows


@torch.no_grad()
def copy_target_layer(module: nn.Module, index, prefix: str, what: str, optional=lambda name: False,
                      hint: str = "") -> list[str]:
    """Copy every tensor of ``module``'s state from the target checkpoint ``index`` (a ``WeightIndex``), tensor
    ``name`` from ``prefix + name`` (fused routed experts also from their per-expert pieces). A tensor the
    checkpoint lacks is refused unless ``optional(name)``; a shape that differs is refused (``hint`` says why it
    may). ``what`` names the draft layer in errors. Returns the names copied."""
    from dspark.targets.weights import expert_parts, fuse_expert_pieces

    copied = []
    for name, tensor in module.state_dict().items():
        source = prefix + name
        pieces = expert_parts(index, source, tuple(tensor.shape))
        if pieces is not None:
            value = fuse_expert_pieces({n: index.load(n, torch.float32) for n in pieces})[source]
        elif source in index:
            value = index.load(source, torch.float32)
        elif optional(name):
            continue
        else:
            raise ValueError(f"{index.model_dir} has no {source} (nor its per-expert pieces) for {what}")
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{source} has shape {tuple(value.shape)} in {index.model_dir}; {what} expects "
                             f"{tuple(tensor.shape)}{hint}")
        tensor.copy_(value.to(tensor.dtype))
        copied.append(name)
    return copied


def draft_slots(anchors_B: torch.Tensor, *, block_size: int, vocab_size: int,
                base_logits: Callable[[], torch.Tensor],
                slot: Callable[[int, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]],
                bias: Callable[[torch.Tensor], torch.Tensor] | None, temperature: float,
                generators: list[torch.Generator | None],
                stop_drafting: Callable[[list[list[float]]], bool] | None = None) -> list[Proposal]:
    """The sequential part of a parallel draft (DSpark's and DeepSeek-V4's): slot by slot, ``slot(k, prev_B)``
    turns each row's previous token (the anchor for slot 0) into the slot's confidence ``[B]`` (None without a
    confidence head) and the input of its Markov bias ``[B, R]`` (None without one); the slot's logits are
    ``base_logits()[:, k]`` (the LM head over every slot, ``[B, K, V]``, computed when a slot is first drafted)
    plus ``bias(input)``, and one token per row is drawn.

    ``stop_drafting`` (``Drafter.cuts_drafting``) is asked after each slot's confidence, before the slot's vocabulary
    work, with every row's confidences so far (slot k included): True means no draft from slot k on can be
    verified, so slot k and the later ones are not drafted (a shorter proposal; no LM head at all when it stops at
    the first slot). Its answer may depend only on the confidences, which depend on the drafts before slot k:
    then cutting changes what is drafted, never what is verified."""
    prev_B, tokens, probs, confs, base_BKV, has_confidence = anchors_B, [], [], [], None, False
    for k in range(block_size):
        conf_B, bias_input = slot(k, prev_B)
        if conf_B is not None:
            has_confidence = True
            confs.append(conf_B)
            if stop_drafting is not None and stop_drafting(torch.stack(confs, dim=1).float().cpu().tolist()):
                confs.pop()
                break
        if base_BKV is None:
            base_BKV = base_logits()
        logits_BV = base_BKV[:, k]
        if bias_input is not None:
            logits_BV = logits_BV + bias(bias_input).float()
        prev_B, p_BV = sample_rows(logits_BV, temperature, generators)
        tokens.append(prev_B)
        probs.append(p_BV)
    B, device = anchors_B.shape[0], anchors_B.device
    tokens_BK = torch.stack(tokens, dim=1) if tokens else anchors_B.new_empty((B, 0))
    probs_BKV = torch.stack(probs, dim=1) if probs else torch.empty((B, 0, vocab_size), device=device)
    conf_BK = (torch.stack(confs, dim=1) if confs else torch.empty((B, 0), device=device)) if has_confidence else None
    return [Proposal(tokens_K=tokens_BK[b], probs_KV=probs_BKV[b],
                     confidence_K=conf_BK[b] if conf_BK is not None else None) for b in range(B)]
