"""Where training samples come from: a finished cache (``CacheReader``) or the target running live (online mode).

Legend: T tokens, L feature layers, H hidden size, V vocab.

Both are a ``SampleSource``: ``len(source)`` samples, and ``iter_samples(seed=, epoch=, rank=, world_size=,
start=)`` yielding this rank's samples of one epoch as the dicts a cache stores (``id``, ``input_ids`` long
``[T]``, ``loss_mask`` bool ``[T]``, ``features_TLH`` bf16 ``[T, L, H]``, ``final_TH`` bf16 ``[T, H]``), and
``num_skipped``, the corrupt samples it has left out so far (``cache.skip_corrupt``). The trainer reads only
that, so it never knows whether features come from disk or from a live target. ``EpochBatches`` turns one rank's
samples of an epoch into micro batches that end on every rank at the same step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from dspark import distributed as dist_utils
from dspark.config import RunConfig
from dspark.targets.base import TargetIdentity


class SampleSource(Protocol):
    def __len__(self) -> int: ...

    @property
    def num_skipped(self) -> int: ...

    def iter_samples(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1, *,
                     start: int = 0) -> Iterator[dict]: ...


@dataclass
class FrozenTarget:
    """What a drafter takes from its target: HF config, identity, and the frozen embedding and LM head."""

    hf_config: object
    identity: TargetIdentity
    embed_VH: torch.Tensor
    lm_head_VH: torch.Tensor


def frozen_parts(target) -> FrozenTarget:
    """Clones: the drafter's engine may cast its parameters in place (bf16), the target must stay untouched."""
    return FrozenTarget(target.config, target.identity(), target.embed_weight.detach().to("cpu", copy=True),
                        target.lm_head_weight.detach().to("cpu", copy=True))


# Where HF causal LMs of the supported families keep the two tensors a drafter reuses.
_EMBED_NAME, _LM_HEAD_NAME = "model.embed_tokens.weight", "lm_head.weight"


def frozen_parts_from_files(target_cfg) -> FrozenTarget | None:
    """The frozen parts read from the target's checkpoint directory alone: its HF config and tokenizer (for the
    identity) and the two tensors, through the safetensors index, without building the model.

    None where that is not possible (a .gguf file or hub id, no safetensors, other tensor names): the caller
    then loads the whole target.
    """
    from transformers import AutoConfig, AutoTokenizer

    from dspark.targets.common import target_identity, torch_dtype
    from dspark.targets.source import resolve_target_source
    from dspark.targets.weights import WeightIndex

    source, gguf_file, display = resolve_target_source(target_cfg.name_or_path)
    if gguf_file or not Path(source).is_dir():
        return None
    try:
        index = WeightIndex(source)
    except FileNotFoundError:
        return None  # e.g. only pytorch_model.bin
    config = AutoConfig.from_pretrained(source)
    lm_head_name = _EMBED_NAME if config.get_text_config().tie_word_embeddings else _LM_HEAD_NAME
    if _EMBED_NAME not in index or lm_head_name not in index:
        return None
    dtype = torch_dtype(target_cfg.dtype)
    # Every backend's identity is built from the config and tokenizer alone, so this one equals the loaded target's.
    identity = target_identity(config.get_text_config(), AutoTokenizer.from_pretrained(source),
                               target_cfg.layer_ids, display)
    return FrozenTarget(config.get_text_config(), identity, index.load(_EMBED_NAME, dtype),
                        index.load(lm_head_name, dtype))


class LiveSource:
    """Samples computed by running ``target`` on the conversations, ``batch_size`` at a time (online mode).

    The epoch order is the one a cache built by one process from the same conversations would be read in
    (``cache.samples_per_shard``, ``cache.shuffle_buffer``), and features are rounded to bf16 exactly as the
    cache writer stores them, so an online run trains on the same samples, in the same order, with the same
    numbers (up to the padding of the capture batches) as a run from that cache. ``start`` must be a multiple
    of ``batch_size`` for a resumed epoch to capture the same padded batches as an uninterrupted one.
    """

    def __init__(self, target, conversations: list[dict], *, batch_size: int, samples_per_shard: int,
                 shuffle_buffer: int):
        from dspark.cache.build import check_conversations, pad_id_of

        if batch_size < 1 or samples_per_shard < 1 or shuffle_buffer < 0:
            raise ValueError(f"LiveSource needs batch_size >= 1, samples_per_shard >= 1 and shuffle_buffer >= 0, "
                             f"got {batch_size}, {samples_per_shard}, {shuffle_buffer}")
        self.target = target
        self.items = check_conversations(conversations)
        vocab = target.identity().vocab_size
        for sample_id, ids, _ in self.items:
            if max(ids) >= vocab:
                raise ValueError(f"conversation {sample_id!r} has token id {max(ids)}, outside the target's "
                                 f"vocabulary of {vocab}")
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        n, per = len(self.items), samples_per_shard
        self.shard_sizes = [min(per, n - i) for i in range(0, n, per)]
        self._pad_id = pad_id_of(target)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_skipped(self) -> int:
        return 0  # live features are never corrupt

    def sample_order(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Conversation indices this rank reads in ``epoch`` (the cache reader's order, see the class doc)."""
        from dspark.cache.stream import epoch_order

        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return epoch_order(self.shard_sizes, seed, epoch, self.shuffle_buffer)[rank::world_size]

    def iter_samples(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1, *,
                     start: int = 0) -> Iterator[dict]:
        from dspark.cache.build import capture_batch

        order = self.sample_order(seed, epoch, rank, world_size)[start:]
        for i in range(0, len(order), self.batch_size):
            batch = [self.items[p] for p in order[i : i + self.batch_size]]
            for sample in capture_batch(self.target, batch, self._pad_id):
                sample["features_TLH"] = sample["features_TLH"].to(torch.bfloat16)
                sample["final_TH"] = sample["final_TH"].to(torch.bfloat16)
                yield sample


class DataFailedError(RuntimeError):
    """Another rank could not read its training data; this one stops with it instead of waiting in a collective."""


class EpochBatches:
    """This rank's micro batches of one epoch, ending on every rank at the same micro batch. Collective.

    Rank r reads its rank stream from position ``start`` (resuming mid epoch) up to ``per_rank``, the sample count
    every rank has, ``micro_batch_size`` samples a batch; an incomplete last batch is dropped. Without skipped
    samples every rank then has ``(per_rank - start) // micro_batch_size`` batches. A source that skips corrupt
    samples (``cache.skip_corrupt``) gives fewer to the ranks that hit them, and since every optimizer step is
    collective (gradient all-reduce) a rank that stopped early would leave the others waiting forever. So
    ``next_batch`` asks all ranks, once a micro batch, whether each still has a batch, and the epoch ends for all
    as soon as one has run out; the others' remaining samples go unused (``totals`` counts them). A rank whose
    data fails (a corrupt sample without skip_corrupt, any error while reading or collating) re-raises its error,
    and every other rank raises ``DataFailedError`` quoting it.

    ``position``: samples of this rank's stream consumed, i.e. batched or skipped (what a resume starts from).
    """

    def __init__(self, source: SampleSource, *, seed: int, epoch: int, rank: int, world_size: int, per_rank: int,
                 micro_batch_size: int, max_seq_len: int, start: int = 0):
        if not 0 <= start <= per_rank:
            raise ValueError(f"EpochBatches: start {start} is outside this rank's 0..{per_rank} samples")
        self.source, self.epoch, self.rank, self.world_size = source, epoch, rank, world_size
        self.per_rank, self.micro_batch_size, self.max_seq_len = per_rank, micro_batch_size, max_seq_len
        self.start = self.position = start
        self.num_batches = 0  # yielded by next_batch (every rank the same)
        self.read_s = 0.0  # seconds spent reading and collating (not waiting for the other ranks)
        self.ended = False  # some rank ran out: the epoch is over for all
        self._skipped_before = source.num_skipped
        self._batches = self._read(seed)

    @property
    def num_skipped(self) -> int:
        """Corrupt samples this rank's source skipped in this epoch so far."""
        return self.source.num_skipped - self._skipped_before

    def _read(self, seed: int) -> Iterator[tuple[dict, int]]:
        """(collated batch, stream position just past its last sample)."""
        from dspark.data.collate import collate

        chunk: list[dict] = []
        samples = self.source.iter_samples(seed=seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                                           start=self.start)
        end, taken = self.start, 0
        # Never ask for a sample past per_rank: a live source would capture it, alone on the ranks that have one.
        while end < self.per_rank and (sample := next(samples, None)) is not None:
            taken += 1
            # The source records a skip when it passes the corrupt sample, before yielding the next good one.
            end = self.start + taken + self.num_skipped
            if end > self.per_rank:
                break
            chunk.append(sample)
            if len(chunk) == self.micro_batch_size:
                yield collate(chunk, self.max_seq_len), end
                chunk = []

    def next_batch(self) -> dict | None:
        """The next micro batch of this rank, or None (on every rank at once) when the epoch is over."""
        if self.ended:
            return None
        t0 = time.perf_counter()
        try:
            item, error = next(self._batches, None), None
        except Exception as exc:  # noqa: BLE001  (re-raised below, once the other ranks know to stop)
            item, error = None, exc
        self.read_s += time.perf_counter() - t0
        # One max-reduction answers both questions: has any rank run out, and which is the lowest rank that failed
        # (sent as world - rank, so the largest value is the lowest rank; 0 = none failed).
        ran_out, failed = dist_utils.all_reduce_ints(
            [item is None and error is None, self.world_size - self.rank if error is not None else 0], op="max")
        if failed:
            messages = dist_utils.all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
            if error is not None:
                raise error
            first = self.world_size - failed
            raise DataFailedError(f"rank {first} could not read its training data in epoch {self.epoch} "
                                  f"({messages[first]}); rank {self.rank} stops too")
        if ran_out:
            self.ended = True
            self._batches.close()  # stop the source's read-ahead now, not when the generator is collected
            return None
        batch, self.position = item
        self.num_batches += 1
        return batch

    def totals(self) -> tuple[int, int]:
        """(corrupt samples skipped, samples left unused) in this epoch so far, summed over ranks. Collective.

        Unused: samples up to ``per_rank`` that were neither trained on nor skipped (the epoch ended for a rank
        that still had them, or they did not fill a last batch); 0 while the epoch has not ended.
        """
        unused = 0
        if self.ended:
            trained = self.num_batches * self.micro_batch_size
            # A skip past per_rank (the one extra sample some ranks have) is counted but not in the budget.
            unused = max(0, self.per_rank - self.start - trained - self.num_skipped)
        skipped, unused = dist_utils.all_reduce_ints([self.num_skipped, unused])
        return skipped, unused


def open_source(cfg: RunConfig, *, cache_dir: Path, conversations_path: Path,
                device: str = "cpu") -> tuple[SampleSource, FrozenTarget]:
    """The sample source of a training run and its target's frozen parts.

    ``train.online``: host the target (``load_target``) on ``device`` and feed live features from the
    conversations at ``conversations_path``, one capture per micro batch. Otherwise read the cache at
    ``cache_dir``, refused when it was built for another target; the frozen parts are then read from the
    checkpoint files without building the target where possible (else it is loaded, then freed).
    """
    from dspark.targets import load_target

    if cfg.train.online:
        from dspark.data.regenerate import read_conversations

        conversations = read_conversations(conversations_path)  # fails fast, before the target loads
        target = load_target(cfg.target, device=device)
        source = LiveSource(target, conversations, batch_size=cfg.train.micro_batch_size,
                            samples_per_shard=cfg.cache.samples_per_shard, shuffle_buffer=cfg.cache.shuffle_buffer)
        return source, frozen_parts(target)

    from dspark.cache import CacheReader

    if not (Path(cache_dir) / "manifest.json").is_file():
        raise ValueError(f"no hidden-state cache at {cache_dir} (manifest.json missing): run `dspark cache build` "
                         f"first, or train online (--set train.online=true)")
    parts = frozen_parts_from_files(cfg.target)  # every backend's identity is the config + tokenizer one
    if parts is None:
        target = load_target(cfg.target)
        parts = frozen_parts(target)
        del target
    reader = CacheReader(cache_dir, expected=parts.identity, shuffle_buffer=cfg.cache.shuffle_buffer,
                         skip_corrupt=cfg.cache.skip_corrupt)
    return reader, parts
