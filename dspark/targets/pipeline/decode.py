"""Incremental decoding on the ``pipeline`` backend: a KV-cached decode session and batched generation.

Legend: B batch, N new tokens in a step, S keys (cached prefix + new tokens), L feature layers, H hidden size,
V vocab, X one token's state between stages (``target.token_shape``: ``[H]``, or ``[C, H]`` with mHC streams).

Every member of one pipeline replica makes the same calls with the same ids, prompts and seeds, in lockstep. One
step: stage 0 embeds the ids; each stage runs its own decoder layers against its own KV cache (a transformers
``DynamicCache`` indexed by global layer id, in which only this stage's layers ever fill up, so ``crop`` rolls
every stage back alike) and sends the hidden state on to the next stage; the last stage applies the final norm
and the LM head (read from the checkpoint on first use). Positions continue from the cached length, and the
causal mask is HF's own, sized from the stage's first cached layer, so the numerics are the hf backend's.

A decode session (one sequence, one step at a time: nothing to overlap) hands every member the fp32 logits and
the feature layers, broadcast from the last stage and from the stages that hold them, since every rank runs the
same speculative-decoding loop on them. ``generate`` keeps up to P batches in flight, one per stage, so the
stages work at once (see ``_drive``): the last stage, the only one with logits, samples with the batch's seeded
generator and sends the tokens back to stage 0, which feeds them in; at the end stage 0 (the replica's first
rank) broadcasts every batch's tokens, so the members cannot drift apart. Greedy results do not depend on which
batches share the pipeline; a batch's samples depend only on its seed.

DeepSeek-V4: every stage needs the token ids (hash-routed MoE), so ``generate`` passes each item's ids along with
its hidden state. Its cache cannot be cropped (the compressors' buffers and emitted entries, and the sliding window
once full, only move forward), so a session rolls back by snapshot and replay as hf does (``ReplayRollback``):
every stage keeps a copy of its own cache from before each extend, and ``truncate`` restores it on every stage and
runs the kept tokens through the stages again, collectively, discarding the outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dspark.targets.base import DecodeSession, softcap_logits
from dspark.targets.common import collapse_streams
from dspark.targets.decode import ReplayRollback, cache_crops_exactly
from dspark.targets.pipeline.stages import TAG_HIDDEN

if TYPE_CHECKING:  # annotations only: the backend imports this module when it decodes
    from dspark.targets.pipeline.backend import PipelineTarget


def _forward(target: PipelineTarget, cache, ids_BN: torch.Tensor,
             position_ids_BN: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """New tokens (no padding) through the replica's stages one after the other, appending to each stage's cache.

    Returns (final hidden ``[B, N, H]`` on the last stage, else None; this stage's features ``[B, N, L_s, *X]`` or
    None). Every member calls with the same ``ids_BN`` (stage 0 and V4's stages read them; the others need the
    shape).
    """
    import torch.distributed as dist

    ranks, stage, last = target.pipe_ranks, target.stage, target.num_stages - 1
    hidden_BNX = None
    if stage > 0:
        hidden_BNX = torch.empty(*ids_BN.shape, *target.token_shape, dtype=target.dtype, device=target.device)
        dist.recv(hidden_BNX, src=ranks[stage - 1], tag=TAG_HIDDEN)
    hidden_BNX, feats_BNLX = target._run_stage(ids_BN, None, hidden_BNX, position_ids_BN, cache)
    if stage < last:
        dist.send(hidden_BNX.contiguous(), dst=ranks[stage + 1], tag=TAG_HIDDEN)
        return None, feats_BNLX
    return hidden_BNX, feats_BNLX


def _logits(target: PipelineTarget, final_BH: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[..., V]`` of the LM head in the target's dtype (as the hf backend: linear, then float, then
    Gemma4's final-logit softcap)."""
    return softcap_logits(torch.nn.functional.linear(final_BH, target.lm_head_weight).float(), target.config)


def _share(target: PipelineTarget, tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
           src_stage: int) -> torch.Tensor:
    """``tensor`` of stage ``src_stage`` on every member of the replica (the others pass None)."""
    import torch.distributed as dist

    if target.num_stages == 1:
        return tensor
    if target.stage == src_stage:
        buf = tensor.contiguous()
    else:
        buf = torch.empty(shape, dtype=dtype, device=target.device)
    dist.broadcast(buf, src=target.pipe_ranks[src_stage], group=target.pipe_group)
    return buf


class PipelineDecodeSession(ReplayRollback, DecodeSession):
    """One sequence; each stage caches the keys/values of its own layers. All members extend/truncate in lockstep
    with the same ids, and every member gets the full logits and features. ``truncate`` crops a full-attention
    cache; other caches (DeepSeek-V4) roll back by snapshot and replay through the stages (``ReplayRollback``)."""

    def __init__(self, target: PipelineTarget):
        from transformers import DynamicCache

        self.target = target
        self.cache = DynamicCache(config=target.config)
        self.length = 0
        self._replays = not cache_crops_exactly(self.cache)
        self._snapshot = None

    def _positions(self, n: int) -> torch.Tensor:
        return torch.arange(self.length, self.length + n, device=self.target.device).view(1, -1)

    @torch.no_grad()
    def extend(self, ids_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.target
        if ids_N.dim() != 1 or ids_N.numel() == 0:
            raise ValueError(f"extend needs a non-empty 1-D tensor of token ids, got shape {tuple(ids_N.shape)}")
        self._remember(ids_N)  # this stage's cache only: each stage snapshots its own
        n = ids_N.numel()
        ids_1N = ids_N.view(1, -1).to(device=t.device, dtype=torch.long)
        final_1NH, feats_1NLX = _forward(t, self.cache, ids_1N, self._positions(n))
        last = t.num_stages - 1
        logits_NV = _logits(t, final_1NH[0]) if t.stage == last else None
        logits_NV = _share(t, logits_NV, (n, t.config.vocab_size), torch.float32, last)
        by_id: dict[int, torch.Tensor] = {}
        for s, ids in enumerate(t.stage_layer_ids):
            if ids:
                part_NLX = _share(t, feats_1NLX[0] if s == t.stage else None, (n, len(ids), *t.token_shape),
                                  t.dtype, s)
                by_id.update(zip(ids, part_NLX.unbind(1)))
        self.length += n
        return logits_NV, collapse_streams(torch.stack([by_id[i] for i in t.layer_ids], dim=1), 3)  # V4: mean of C

    @torch.no_grad()
    def _replay(self, ids_N: torch.Tensor) -> None:
        # Every member replays the same ids (they truncate in lockstep): the stages pass the hidden state on as in
        # extend, and nothing is shared since the outputs are discarded.
        t = self.target
        _forward(t, self.cache, ids_N.view(1, -1).to(device=t.device, dtype=torch.long), self._positions(ids_N.numel()))


# -- generate ----------------------------------------------------------------------------------------------
# Work items: stage 0 drives. Each of up to P batches in flight has a slot (its own KV cache on every stage);
# stage 0 runs its layers on a slot's next input and passes the item (a header, then the hidden state) on, the
# last stage samples and sends the tokens back to stage 0, which meanwhile works on the other slots: P batches
# keep the P stages busy. Every stage handles the items in the order stage 0 issued them.
_TAG_ITEM, _TAG_TOKENS, _TAG_IDS = 4, 5, 6  # p2p message kinds beside the backend's 1..3
_PREFILL, _STEP, _END = 0, 1, 2  # item kinds: a new batch in a slot, one more token of a slot's batch, no more items


class _Slot:
    """One batch in flight: its cache and inputs on every stage, its sampler on the last, its tokens on stage 0."""

    def __init__(self, target: PipelineTarget, batch: int, prompts: list[list[int]], pad_id: int, sampler):
        from transformers import DynamicCache

        device = target.device
        self.batch = batch
        B, width = len(prompts), max(len(p) for p in prompts)
        self.ids_BN = torch.full((B, width), pad_id, dtype=torch.long, device=device)  # left padding
        self.mask_BS = torch.zeros_like(self.ids_BN)
        for row, p in enumerate(prompts):
            self.ids_BN[row, width - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
            self.mask_BS[row, width - len(p) :] = 1
        # As HF generate: positions count real tokens only; pad slots are masked keys.
        self.positions_BN = (self.mask_BS.cumsum(-1) - 1).masked_fill(self.mask_BS == 0, 1)
        self.cache = DynamicCache(config=target.config)
        self.sampler = sampler  # per-prompt seeded draws (dspark.targets.sampling)
        self.done_B = torch.zeros(B, dtype=torch.bool, device=device)
        self.tokens: list[torch.Tensor] = []

    def advance(self, next_B: torch.Tensor | None) -> None:
        """Inputs of the next step: one token per row (stage 0 knows which), one position and key more."""
        if next_B is not None:
            self.ids_BN = next_B.view(-1, 1)
        self.positions_BN = self.positions_BN[:, -1:] + 1
        self.mask_BS = torch.cat([self.mask_BS, torch.ones_like(self.mask_BS[:, :1])], dim=1)


def _sample(target: PipelineTarget, slot: _Slot, final_BNH: torch.Tensor, temperature: float, pad_id: int):
    """Last stage: the next token of every row (pad for rows already done)."""
    logits_BV = _logits(target, final_BNH[:, -1])
    next_B = slot.sampler.sample(logits_BV, temperature)
    return torch.where(slot.done_B, torch.full_like(next_B, pad_id), next_B)


@torch.no_grad()
def generate(target: PipelineTarget, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
             batch_size: int, seed: int, progress: bool = False, indices: list[int] | None = None) -> list[list[int]]:
    """``PipelineTarget.generate``: batches of prompts sorted by length, left-padded, each prompt sampled from
    (seed, its index) (``dspark.targets.sampling``); up to one batch per stage in flight. The tokens are
    broadcast from stage 0 at the end."""
    tok = target.tokenizer
    if tok is None:
        raise ValueError(f"generate needs the tokenizer of target {target.name} (stop and pad ids), and "
                         f"{target.model_dir} has no tokenizer files")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"generate needs batch_size >= 1 and max_new_tokens >= 1, got {batch_size} and "
                         f"{max_new_tokens}")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"generate got empty prompts at indices {empty[:5]}; every prompt needs a token")
    if not prompts:
        return []
    from dspark.targets.sampling import RowSampler, batch_indices

    indices = batch_indices(indices, len(prompts))
    eos, pad_id = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def new_slot(b: int) -> _Slot:  # the same seeds for a batch on every member, whatever is in flight beside it
        return _Slot(target, b, [prompts[i] for i in batches[b]], pad_id,
                     RowSampler(seed, [indices[i] for i in batches[b]]))

    if target.stage == 0:
        rows = _drive(target, batches, new_slot, max_new_tokens, temperature, eos, pad_id, progress)
    else:
        _follow(target, new_slot, temperature, eos, pad_id)
        rows = None
    # Stage 0, the replica's first rank, holds every batch's tokens: its copy is everyone's.
    on = {"dtype": torch.long, "device": target.device}
    lengths = _share(target, None if rows is None else torch.tensor([len(r) for r in rows], **on), (len(order),),
                     torch.long, 0)
    flat = _share(target, None if rows is None else torch.tensor([t for r in rows for t in r], **on),
                  (int(lengths.sum()),), torch.long, 0)
    new_rows = [r.tolist() for r in flat.cpu().split(lengths.tolist())]
    outputs: list[list[int]] = [[] for _ in prompts]
    for i, row in zip([i for b in batches for i in b], new_rows):
        outputs[i] = row
    return outputs


def _drive(target: PipelineTarget, batches: list[list[int]], new_slot, max_new_tokens: int, temperature: float,
           eos: int | None, pad_id: int, progress: bool) -> list[list[int]]:
    """Stage 0: issue the items, collect the tokens; returns the new tokens of every row, batch after batch."""
    import collections

    import torch.distributed as dist
    from tqdm import tqdm

    ranks, last = target.pipe_ranks, target.num_stages - 1
    pending: list = []  # (work, tensor) of non-blocking sends still in flight
    local_tokens: collections.deque = collections.deque()  # a 1-stage pipeline samples here
    slots: list[_Slot | None] = [None] * target.num_stages
    in_flight: collections.deque = collections.deque()  # slot indices, in issue order
    done_rows: dict[int, list[list[int]]] = {}

    def issue(k: int, kind: int) -> None:
        slot = slots[k]
        hidden_BNX, _ = target._run_stage(slot.ids_BN, slot.mask_BS, None, slot.positions_BN, slot.cache)
        if last == 0:
            local_tokens.append(_sample(target, slot, hidden_BNX, temperature, pad_id))
        else:
            B, N = slot.ids_BN.shape
            header = torch.tensor([k, kind, slot.batch, B, N], dtype=torch.long, device=target.device)
            outgoing = [(header, _TAG_ITEM), (hidden_BNX.contiguous(), TAG_HIDDEN)]
            if target.streams:  # V4: every stage routes by token id
                outgoing.append((slot.ids_BN.contiguous(), _TAG_IDS))
            for tensor, tag in outgoing:
                pending.append((dist.isend(tensor, dst=ranks[1], tag=tag), tensor))
        in_flight.append(k)

    bar = tqdm(total=len(batches), desc="regenerate", disable=not progress, unit="batch")
    next_batch = 0
    for k in range(min(target.num_stages, len(batches))):
        slots[k], next_batch = new_slot(next_batch), next_batch + 1
        issue(k, _PREFILL)
    while in_flight:
        k = in_flight.popleft()
        slot = slots[k]
        if last == 0:
            next_B = local_tokens.popleft()
        else:
            next_B = torch.empty(slot.done_B.shape[0], dtype=torch.long, device=target.device)
            dist.recv(next_B, src=ranks[last], tag=_TAG_TOKENS)
        slot.tokens.append(next_B)
        if eos is not None:
            slot.done_B |= next_B == eos
        if bool(slot.done_B.all()) or len(slot.tokens) == max_new_tokens:
            out = torch.stack(slot.tokens, dim=1).tolist()
            done_rows[slot.batch] = [row[: row.index(eos) + 1] if eos in row else row for row in out]
            bar.update()
            slots[k] = None
            if next_batch < len(batches):
                slots[k], next_batch = new_slot(next_batch), next_batch + 1
                issue(k, _PREFILL)
        else:
            slot.advance(next_B)
            issue(k, _STEP)
        pending = [(w, t) for w, t in pending if not w.is_completed()]
    bar.close()
    if last > 0:
        end = torch.tensor([0, _END, 0, 0, 0], dtype=torch.long, device=target.device)
        dist.send(end, dst=ranks[1], tag=_TAG_ITEM)
    for work, _ in pending:
        work.wait()
    return [row for b in range(len(batches)) for row in done_rows[b]]


def _follow(target: PipelineTarget, new_slot, temperature: float, eos: int | None, pad_id: int) -> None:
    """Stages 1..P-1: run the items in the order they arrive; the last stage samples and returns the tokens."""
    import torch.distributed as dist

    ranks, stage, last = target.pipe_ranks, target.stage, target.num_stages - 1
    pending: list = []
    slots: dict[int, _Slot] = {}
    header = torch.empty(5, dtype=torch.long, device=target.device)
    while True:
        dist.recv(header, src=ranks[stage - 1], tag=_TAG_ITEM)
        k, kind, batch, B, N = header.tolist()
        if kind == _END:
            if stage < last:
                dist.send(header, dst=ranks[stage + 1], tag=_TAG_ITEM)
            break
        if kind == _PREFILL:
            slots[k] = new_slot(batch)
        else:
            slots[k].advance(None)
        slot = slots[k]
        hidden_BNX = torch.empty(B, N, *target.token_shape, dtype=target.dtype, device=target.device)
        dist.recv(hidden_BNX, src=ranks[stage - 1], tag=TAG_HIDDEN)
        ids_BN = None
        if target.streams:
            ids_BN = torch.empty(B, N, dtype=torch.long, device=target.device)
            dist.recv(ids_BN, src=ranks[stage - 1], tag=_TAG_IDS)
        hidden_BNX, _ = target._run_stage(ids_BN, slot.mask_BS, hidden_BNX, slot.positions_BN, slot.cache)
        if stage < last:
            outgoing = [(header.clone(), _TAG_ITEM, ranks[stage + 1]),
                        (hidden_BNX.contiguous(), TAG_HIDDEN, ranks[stage + 1])]
            if ids_BN is not None:
                outgoing.append((ids_BN, _TAG_IDS, ranks[stage + 1]))
        else:
            next_B = _sample(target, slot, hidden_BNX, temperature, pad_id)
            if eos is not None:  # rows done from the next step on sample pad, as on stage 0's side
                slot.done_B |= next_B == eos
            outgoing = [(next_B, _TAG_TOKENS, ranks[0])]
        for tensor, tag, dst in outgoing:
            pending.append((dist.isend(tensor, dst=dst, tag=tag), tensor))
        pending = [(w, t) for w, t in pending if not w.is_completed()]
    for work, _ in pending:
        work.wait()
