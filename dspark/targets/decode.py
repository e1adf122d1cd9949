"""Decoding shared by the backends that run transformers' whole model (hf, zero3, megatron): batched ``generate``
through transformers' own generation, and the incremental ``HFDecodeSession`` with its rollback (``ReplayRollback``,
which the pipeline's session shares).

Legend: B batch, N new tokens, L feature layers, H hidden size, V vocab.
"""

from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple

import torch

from dspark.targets.base import DecodeSession, softcap_logits
from dspark.targets.common import raw_last_hidden_state, select_layers


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, batch_size: int,
             seed: int, progress: bool = False, indices: list[int] | None = None, device=None, synced: bool = False,
             forward_context=contextlib.nullcontext, after_batch=None) -> list[list[int]]:
    """``TargetBackend.generate`` through transformers' ``model.generate``: prompts sorted by length (little
    padding per batch), left-padded, greedy or sampled per prompt (``dspark.targets.sampling``); results in the
    prompts' order, each cut after its stop token.

    ``synced``: ranks holding different numbers of prompts step together (every forward is a collective, zero3): a
    rank out of batches runs a one-token dummy batch, and transformers' ``synced_gpus`` keeps every rank stepping
    until all are done. ``forward_context`` wraps each ``generate`` call, ``after_batch`` runs after each batch.
    """
    import torch.distributed as dist
    from tqdm import tqdm

    from dspark.targets.sampling import RowSampler, batch_indices, row_sampling_processor

    indices = batch_indices(indices, len(prompts))
    device = model.device if device is None else device
    tok = tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outputs: list[list[int]] = [None] * len(prompts)  # type: ignore[list-item]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    world = dist.get_world_size() if synced and dist.is_initialized() else 1
    num_batches = torch.tensor(len(batches))
    if world > 1:
        dist.all_reduce(num_batches, op=dist.ReduceOp.MAX)
    for step in tqdm(range(int(num_batches)), desc="regenerate", disable=not progress, unit="batch"):
        batch_idx = batches[step] if step < len(batches) else []
        rows = [prompts[i] for i in batch_idx] or [[pad_id]]  # the dummy batch of an idle rank
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(rows):  # left padding for generation
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        # greedy over the per-prompt draws of the processor; an idle rank's dummy row draws as index 0
        sampler = RowSampler(seed, [indices[i] for i in batch_idx] or [0])
        with forward_context():
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None,
                logits_processor=[row_sampling_processor(sampler, temperature)] if temperature > 0 else None,
                pad_token_id=pad_id, eos_token_id=tok.eos_token_id, **({"synced_gpus": world > 1} if synced else {}),
            )
        for row, i in enumerate(batch_idx):
            new = gen[row, width:].tolist()
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id) + 1]
            outputs[i] = new
        if after_batch is not None:
            after_batch()
    return outputs


def cache_crops_exactly(cache) -> bool:
    """Whether ``cache.crop`` drops the last tokens exactly, leaving the state of a cache fed only the others.

    Only plain full-attention layers (``DynamicLayer``) qualify: they keep every position and nothing else. A
    sliding-window layer has forgotten its oldest keys once full (its crop then fails), and DeepSeek-V4's
    compressed-attention layers also carry compressor buffers and emitted entries that crop leaves as they were.
    """
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


class _Snapshot(NamedTuple):
    """The cache before the last extend (a deep copy), its length then, and the ids that extend fed."""

    cache: object
    length: int
    ids_N: torch.Tensor


class ReplayRollback:
    """``truncate`` for decode sessions whose cache (``self.cache``, ``self.length`` tokens) may not crop exactly.

    A cache that crops exactly (``cache_crops_exactly``) is cropped, with no other cost. Otherwise each
    ``extend`` first calls ``_remember``, which keeps a deep copy of the cache and the ids fed; ``truncate(L)``
    then puts that copy back and re-feeds the first ``L - snapshot length`` of those ids through ``_replay``
    (outputs discarded), so the state is that of a session fed only the kept tokens. Only tokens of the last
    extend can be dropped, once; speculative decoding never needs more. Subclasses set ``self._snapshot = None``
    and ``self._replays = not cache_crops_exactly(self.cache)`` and define ``_replay(ids_N)``.
    """

    target: object  # the backend: its ``name`` and ``config.model_type`` go into errors
    cache: object
    length: int
    _snapshot: _Snapshot | None
    _replays: bool

    def _replay(self, ids_N: torch.Tensor) -> None:
        raise NotImplementedError

    def _remember(self, ids_N: torch.Tensor) -> None:
        if self._replays:
            self._snapshot = _Snapshot(copy.deepcopy(self.cache), self.length, ids_N.clone())

    def truncate(self, length: int) -> None:
        """Forget every position ``>= length`` (a no-op when ``length`` is not below the current length)."""
        if length < 0:
            raise ValueError(f"truncate needs a length >= 0, got {length}")
        if length >= self.length:
            return
        if not self._replays:
            self.cache.crop(length - self.length)  # transformers 5 takes the (negative) count to drop
            self.length = length
            return
        snapshot = self._snapshot
        if snapshot is None or length < snapshot.length:
            since = "none since the last rollback" if snapshot is None else f"it started at {snapshot.length}"
            raise ValueError(f"truncate({length}) of a {self.length}-token decode session: target {self.target.name} "
                             f"({self.target.config.model_type}) cannot crop its cache and rolls back by replaying "
                             f"from a snapshot taken at the last extend, so only that extend's tokens can be dropped "
                             f"({since}); start a new session to go further back")
        self._snapshot = None  # the replay below moves the snapshot's cache forward
        self.cache, self.length = snapshot.cache, snapshot.length
        keep = length - snapshot.length
        if keep:
            self._replay(snapshot.ids_N[:keep])
            self.length = length


class HFDecodeSession(ReplayRollback, DecodeSession):
    """Incremental decoding with transformers' KV cache on ``target.model`` (hf, zero3, megatron), on
    ``target.device``; every forward runs inside ``forward_context()`` (zero3 gathers its parameters there).

    ``truncate`` crops a full-attention cache; other caches (DeepSeek-V4's sliding-window and compressor layers)
    roll back by snapshot and replay (see ``ReplayRollback``), the replay inside ``_forward_context`` like any
    forward, so zero3's ranks gather parameters in lockstep as long as they truncate in lockstep.
    """

    def __init__(self, target, forward_context=contextlib.nullcontext):
        from transformers import DynamicCache

        self.target = target
        self.cache = DynamicCache(config=target.model.config)
        self.length = 0
        self._replays = not cache_crops_exactly(self.cache)
        self._snapshot = None
        self._forward_context = forward_context

    def _device(self) -> torch.device:
        return self.target.device

    def _positions(self, n: int) -> torch.Tensor:
        return torch.arange(self.length, self.length + n, device=self._device()).view(1, -1)

    @torch.no_grad()
    def extend(self, ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.target.model
        self._remember(ids_N)
        ids_1N = ids_N.view(1, -1).to(self._device())
        with self._forward_context(), raw_last_hidden_state(model):
            out = model.base_model(input_ids=ids_1N, position_ids=self._positions(ids_1N.shape[1]), cache=self.cache,
                                   use_cache=True, output_hidden_states=True)
            logits_NV = softcap_logits(model.get_output_embeddings()(out.last_hidden_state[0]).float(), model.config)
        self.length += ids_1N.shape[1]
        return logits_NV, select_layers(out.hidden_states, self.target.layer_ids)[0]

    @torch.no_grad()
    def _replay(self, ids_N: torch.Tensor) -> None:
        ids_1N = ids_N.view(1, -1).to(self._device())
        with self._forward_context():
            self.target.model.base_model(input_ids=ids_1N, position_ids=self._positions(ids_1N.shape[1]),
                                         cache=self.cache, use_cache=True)
