"""Streaming a cache for training: the epoch order, rank and loader-worker slices, prefetch, resumable position.

The order of one epoch is a pure function of (seed, epoch, shard sizes, shuffle buffer), the same on every rank:

1. shards in a permutation seeded by (seed, epoch), each shard's samples in index order (sequential reads);
2. that stream through a bounded shuffle buffer of ``shuffle_buffer`` samples seeded by (seed, epoch): fill the
   buffer, then for every further sample emit a random buffer slot and put the sample there; finally emit the
   buffer in a random order. A buffer at least as large as the cache is a full permutation.
   ``shuffle_buffer=0`` turns both off (manifest order).

Rank r of W takes positions ``r, r + W, r + 2W, ...`` of that order (its *rank stream*; lengths differ by at most
one). A stream at ``position`` p has consumed the first p samples of its rank stream; loader worker w of K takes
the remaining ones at ``p + w, p + w + K, ...``, so a torch DataLoader (``batch_size=None``, in-order round robin
over its workers) yields exactly the rank stream again, and the union over ranks and workers is every sample
once per epoch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch.utils.data

from dspark.cache.format import CacheCorruptError

STATE_VERSION = 1


def epoch_order(shard_sizes: list[int], seed: int, epoch: int, shuffle_buffer: int) -> list[int]:
    """Global sample positions (manifest order numbering) of one epoch; see the module docstring."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    if shuffle_buffer < 0:
        raise ValueError(f"cache.shuffle_buffer must be >= 0 (0 = no shuffle), got {shuffle_buffer}")
    starts = np.concatenate([[0], np.cumsum(shard_sizes)]).astype(np.int64)
    if shuffle_buffer == 0:
        return list(range(int(starts[-1])))
    rng = np.random.default_rng([seed, epoch])
    stream = [p for s in rng.permutation(len(shard_sizes)).tolist() for p in range(starts[s], starts[s + 1])]
    size = min(shuffle_buffer, len(stream))
    buffer, out = stream[:size], []
    for incoming, slot in zip(stream[size:], rng.integers(0, size, len(stream) - size).tolist()):
        out.append(buffer[slot])
        buffer[slot] = incoming
    out.extend(buffer[i] for i in rng.permutation(size).tolist())
    return [int(p) for p in out]


class CacheStream(torch.utils.data.IterableDataset):
    """One rank's pass over a ``CacheReader`` for one epoch, resumable from ``state_dict()``.

    Iterating yields the samples of the rank stream from ``position`` on, decoding up to ``prefetch`` samples
    ahead on ``num_threads`` background threads (``prefetch=0`` or ``num_threads=0``: decode inline). In the
    consuming process every yielded sample advances ``position``; running to the end moves the state to
    ``(epoch + 1, position 0)``. ``state_dict()`` taken at any point and loaded into a fresh stream continues
    with exactly the samples an uninterrupted epoch would still have yielded.

    As a torch ``IterableDataset`` under ``DataLoader(stream, batch_size=None, num_workers=K)`` every worker
    takes its slice of the remaining rank stream, and the loader yields the same sequence as in-process
    iteration; the workers' copies do not update this object, so record ``position + samples received`` yourself
    (``state_dict(position=...)``). With ``reader.skip_corrupt`` a corrupt sample is skipped (it still counts as
    consumed) and recorded in ``reader.skipped`` of the iterating process.
    """

    def __init__(self, reader, *, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int | None = None, num_threads: int = 2, prefetch: int = 8,
                 worker: int | None = None, num_workers: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if (worker is None) != (num_workers is None) or (num_workers is not None and not 0 <= worker < num_workers):
            raise ValueError(f"give both worker and num_workers with 0 <= worker < num_workers, got worker={worker}, "
                             f"num_workers={num_workers}")
        if num_threads < 0 or prefetch < 0:
            raise ValueError(f"num_threads and prefetch must be >= 0, got {num_threads} and {prefetch}")
        self.reader = reader
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.shuffle_buffer = reader.shuffle_buffer if shuffle_buffer is None else shuffle_buffer
        self.num_threads, self.prefetch = num_threads, prefetch
        self.worker, self.num_workers = worker, num_workers
        self.position = 0
        epoch_order([], seed, epoch, self.shuffle_buffer)  # validates seed, epoch and buffer now

    # -- order ----------------------------------------------------------------------------------------------

    def rank_order(self) -> list[int]:
        """Positions of this rank's whole stream for the current epoch."""
        return self.reader.epoch_order(self.seed, self.epoch, self.shuffle_buffer)[self.rank :: self.world_size]

    def _worker_slice(self) -> tuple[int, int]:
        if self.num_workers is not None:
            return self.worker, self.num_workers
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def __len__(self) -> int:
        """Samples this rank still has to read in this epoch (all workers together)."""
        return max(0, len(self.rank_order()) - self.position)

    # -- iteration ------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker_slice()
        remaining = self.rank_order()[self.position :]
        positions = remaining[worker::num_workers]
        # Only a single consumer can say how far the rank stream got; a worker's copy of the state is moot.
        tracks = num_workers == 1
        for sample in self._decoded(positions):
            if tracks:
                self.position += 1
            if sample is not None:
                yield sample
        if tracks:
            self.epoch, self.position = self.epoch + 1, 0

    def _decoded(self, positions: list[int]) -> Iterator[dict | None]:
        """Samples (None for one skipped as corrupt) in order, decoded ahead through a bounded queue of futures."""
        if self.num_threads == 0 or self.prefetch == 0:
            for position in positions:
                yield self._checked(lambda p=position: self.reader[p])
            return
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="cache-read")
        try:
            ahead: deque = deque()
            for position in positions:
                ahead.append(pool.submit(self.reader.__getitem__, position))
                if len(ahead) > self.prefetch:
                    yield self._checked(ahead.popleft().result)
            while ahead:
                yield self._checked(ahead.popleft().result)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _checked(self, read) -> dict | None:
        try:
            return read()
        except CacheCorruptError as exc:
            if not self.reader.skip_corrupt or exc.sample_id is None:
                raise
            self.reader.record_skip(exc)
            return None

    # -- state ----------------------------------------------------------------------------------------------

    def state_dict(self, position: int | None = None) -> dict:
        """JSON-able position of this stream (``position`` overrides the tracked one, for DataLoader workers)."""
        return {"version": STATE_VERSION, "epoch": self.epoch,
                "position": self.position if position is None else position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "shuffle_buffer": self.shuffle_buffer, "num_samples": len(self.reader),
                "cache_fingerprint": self.reader.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` was taken; refuses a state of another order (seed, ranks, buffer, cache
        contents)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"cache stream state has version {state.get('version')!r}, this dspark reads "
                             f"version {STATE_VERSION}")
        ours = self.state_dict()
        bad = [f"{key}: {state.get(key)!r} (state) vs {ours[key]!r} (this stream)"
               for key in ("seed", "rank", "world_size", "shuffle_buffer", "num_samples", "cache_fingerprint")
               if state.get(key) != ours[key]]
        if bad:
            raise ValueError(f"cache stream state was taken for a different sample order: {'; '.join(bad)}")
        position, total = state["position"], len(range(self.rank, len(self.reader), self.world_size))
        if not 0 <= position <= total:
            raise ValueError(f"cache stream state position {position} is outside this rank's 0..{total} samples")
        self.epoch, self.position = state["epoch"], position
