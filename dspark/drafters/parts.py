"""What the drafters share besides layers: the frozen target matrices, the checks of their constructor and proposal
arguments, and the decoding-time prefix cache.

Legend: T context rows, V vocab, H hidden size.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

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
