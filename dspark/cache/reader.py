"""Reading a finished cache: identity checks, random access by id, streaming epochs, integrity.

Legend: T tokens, L feature layers, H hidden size. The epoch order and its rank / loader-worker slices are in
``dspark.cache.stream``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from dspark.cache import codecs
from dspark.cache.format import (
    FIELDS,
    ID_MASK_CODECS,
    CacheCorruptError,
    checksum,
    new_hasher,
    read_manifest,
    read_shard_index,
)
from dspark.cache.stream import CacheStream, epoch_order
from dspark.targets.base import TargetIdentity

logger = logging.getLogger(__name__)


class SkippedSample(NamedTuple):
    """A corrupt sample that iteration with ``skip_corrupt=True`` left out."""

    shard: str
    sample_id: str
    offset: int
    reason: str


class CacheReader:
    """A finished cache directory, opened read-only.

    ``expected``: the target the caller trains against; a cache built for a different one (config hash,
    layer ids, hidden size, vocab size, tokenizer) is refused. Samples come back as dicts with ``id``,
    ``input_ids`` long ``[T]``, ``loss_mask`` bool ``[T]``, ``features_TLH`` bf16 ``[T, L, H]`` and
    ``final_TH`` bf16 ``[T, H]``. Every read checks the sample's checksum (``CacheCorruptError`` naming the
    shard, sample id and byte offset). ``shuffle_buffer`` is the default of ``stream`` / ``iter_samples``
    (``cache.shuffle_buffer``). ``skip_corrupt`` (``cache.skip_corrupt``): iteration skips corrupt samples
    instead of raising, counting them in ``num_skipped`` and listing them in ``skipped``; random access by id
    always raises.
    """

    def __init__(self, cache_dir, expected: TargetIdentity | None = None, *, shuffle_buffer: int = 1024,
                 skip_corrupt: bool = False):
        if shuffle_buffer < 0:
            raise ValueError(f"cache.shuffle_buffer must be >= 0 (0 = no shuffle), got {shuffle_buffer}")
        self.shuffle_buffer = shuffle_buffer
        self.skip_corrupt = skip_corrupt
        self.skipped: list[SkippedSample] = []
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        self.target: dict = self.manifest["target"]
        if expected is not None:
            bad = expected.mismatches(self.target)
            if bad:
                raise ValueError(f"cache {self.cache_dir} was built for a different target: {'; '.join(bad)}")
        field_codecs = self.manifest["codecs"]
        for key, name in ID_MASK_CODECS.items():
            if field_codecs.get(key) != name:
                raise ValueError(
                    f"cache {self.cache_dir}: unknown {key} codec {field_codecs.get(key)!r}, expected {name!r}"
                )
        self._feature_codecs = {key: codecs.get_codec(field_codecs[key]) for key in ("features_TLH", "final_TH")}
        self.num_layers = len(self.target["layer_ids"])
        self.hidden_size = self.target["hidden_size"]

        # One (shard file, index entry) per sample, in manifest order.
        self._entries: list[tuple[str, dict]] = []
        self.shard_sizes: list[int] = [shard["num_samples"] for shard in self.manifest["shards"]]
        for shard in self.manifest["shards"]:
            shard_index = read_shard_index(self.cache_dir, shard["file"])
            if shard_index["checksum"] != shard["checksum"] or len(shard_index["samples"]) != shard["num_samples"]:
                raise CacheCorruptError(
                    f"{self.cache_dir / shard['file']}: its index does not match manifest.json "
                    f"(shard rewritten after finalize?)"
                )
            self._entries.extend((shard["file"], entry) for entry in shard_index["samples"])
        self._position = {entry["id"]: i for i, (_, entry) in enumerate(self._entries)}
        # Names this cache's contents and order (shard checksums in manifest order): a saved stream position
        # is only meaningful for the same cache.
        self.fingerprint = checksum("".join(shard["checksum"] for shard in self.manifest["shards"]).encode())
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._order_cache: tuple = (None, None)

    @property
    def identity(self) -> TargetIdentity:
        names = {f.name for f in dataclasses.fields(TargetIdentity)}
        return TargetIdentity(**{k: v for k, v in self.target.items() if k in names})

    @property
    def ids(self) -> list[str]:
        return [entry["id"] for _, entry in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._position

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample index {i} out of range for a cache of {len(self)} samples")
        return self._read(i % len(self))

    def get(self, sample_id: str) -> dict:
        """The sample called ``sample_id`` (random access through the shard index)."""
        if sample_id not in self._position:
            raise KeyError(f"sample id {sample_id!r} is not in cache {self.cache_dir}")
        return self._read(self._position[sample_id])

    # -- decoding -------------------------------------------------------------------------------------------

    def _fd(self, shard: str) -> int:
        with self._lock:
            if shard not in self._fds:
                self._fds[shard] = os.open(self.cache_dir / shard, os.O_RDONLY)
            return self._fds[shard]

    def _read(self, position: int) -> dict:
        shard, entry = self._entries[position]
        where = f"{self.cache_dir / shard}: sample {entry['id']!r} at offset {entry['offset']}"

        def corrupt(reason: str) -> CacheCorruptError:
            return CacheCorruptError(f"{where}: {reason}", shard=shard, sample_id=entry["id"],
                                     offset=entry["offset"], reason=reason)

        try:
            fd = self._fd(shard)
        except FileNotFoundError:
            raise corrupt("shard file is missing (listed in manifest.json)") from None
        data = os.pread(fd, entry["length"], entry["offset"])  # pread: thread-safe, no seek state
        if len(data) != entry["length"]:
            raise corrupt(f"shard is truncated (got {len(data)} of {entry['length']} bytes)")
        if checksum(data) != entry["checksum"]:
            raise corrupt("checksum mismatch (stored bytes are corrupt)")
        blobs, start = [], 0
        for length in entry["field_lengths"]:
            blobs.append(data[start : start + length])
            start += length
        T, L, H = entry["num_tokens"], self.num_layers, self.hidden_size
        try:
            sample = {
                "id": entry["id"],
                "input_ids": codecs.decode_ids(blobs[0], T),
                "loss_mask": codecs.decode_mask(blobs[1], T),
                "features_TLH": self._feature_codecs["features_TLH"].decode(blobs[2], (T, L, H)),
                "final_TH": self._feature_codecs["final_TH"].decode(blobs[3], (T, H)),
            }
        except Exception as exc:  # a checksum-valid record that does not decode was written wrongly
            raise corrupt(f"cannot decode ({exc})") from exc
        assert set(sample) == {"id", *FIELDS}
        return sample

    # -- iteration ------------------------------------------------------------------------------------------

    def stream(self, seed: int, epoch: int = 0, rank: int = 0, world_size: int = 1, *,
               shuffle_buffer: int | None = None, num_threads: int = 2, prefetch: int = 8,
               worker: int | None = None, num_workers: int | None = None) -> CacheStream:
        """A resumable pass over this rank's samples of ``epoch`` (see ``CacheStream``); also a torch
        ``IterableDataset``. ``shuffle_buffer`` defaults to the reader's."""
        return CacheStream(self, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                           shuffle_buffer=shuffle_buffer, num_threads=num_threads, prefetch=prefetch,
                           worker=worker, num_workers=num_workers)

    def epoch_order(self, seed: int, epoch: int, shuffle_buffer: int) -> list[int]:
        """Global sample positions of ``epoch`` (see ``dspark.cache.stream.epoch_order``); the last one is kept
        because a million-sample order takes about a second to draw."""
        key = (seed, epoch, shuffle_buffer)
        if self._order_cache[0] != key:
            self._order_cache = (key, epoch_order(self.shard_sizes, seed, epoch, shuffle_buffer))
        return self._order_cache[1]

    def sample_order(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                     shuffle: bool = True) -> list[int]:
        """Positions this rank reads in ``epoch`` (its rank stream; ``shuffle=False``: manifest order).

        Ranks' slices are disjoint and together cover every sample once; their lengths differ by at most one.
        """
        return self.stream(seed, epoch, rank, world_size, shuffle_buffer=None if shuffle else 0).rank_order()

    def iter_samples(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                     *, start: int = 0, num_threads: int = 2, prefetch: int = 8,
                     state: dict | None = None) -> Iterator[dict]:
        """Yield this rank's samples for ``epoch`` in a deterministic order, decoding ahead on threads.

        ``start`` skips the first ``start`` samples of this rank's stream (resuming mid-epoch); ``state`` (a
        ``CacheStream.state_dict()``) resumes from a saved position instead and must agree with the arguments.
        """
        stream = self.stream(seed, epoch, rank, world_size, shuffle_buffer=None if shuffle else 0,
                             num_threads=num_threads, prefetch=prefetch)
        if state is not None:
            if start:
                raise ValueError(f"iter_samples: give start ({start}) or state, not both")
            stream.load_state_dict(state)
            if stream.epoch != epoch:
                raise ValueError(f"iter_samples: state is for epoch {stream.epoch}, asked for epoch {epoch}")
        elif start:
            stream.load_state_dict(stream.state_dict(position=start))
        return iter(stream)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def record_skip(self, error: CacheCorruptError) -> None:
        """Count and log one corrupt sample skipped by iteration (``skip_corrupt=True``)."""
        self.skipped.append(SkippedSample(error.shard, error.sample_id, error.offset, error.reason))
        logger.warning("skipped corrupt cache sample %d (cache.skip_corrupt): %s", self.num_skipped, error)

    # -- integrity ------------------------------------------------------------------------------------------

    def verify(self) -> int:
        """Check every shard's size and whole-file checksum; returns the number of samples checked.

        The samples of a bad shard are then read one by one. All faults are collected before raising one
        ``CacheCorruptError`` whose message names the first (shard, sample id, offset) and counts the rest, and
        whose ``faults`` attribute holds every fault's error.
        """
        faults: list[CacheCorruptError] = []
        for shard in self.manifest["shards"]:
            path = self.cache_dir / shard["file"]
            hasher, size = new_hasher(), 0
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        hasher.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                size = -1
            if size == shard["num_bytes"] and hasher.hexdigest() == shard["checksum"]:
                continue
            found = len(faults)
            for position, (name, _) in enumerate(self._entries):
                if name == shard["file"]:
                    try:
                        self._read(position)
                    except CacheCorruptError as exc:
                        faults.append(exc)
            if len(faults) == found:  # every sample is intact: the damage is outside them (e.g. appended bytes)
                faults.append(CacheCorruptError(f"{path}: file checksum or size differs from manifest.json "
                                                f"({size} bytes, manifest says {shard['num_bytes']})",
                                                shard=shard["file"]))
        if faults:
            more = f" (and {len(faults) - 1} more faults)" if len(faults) > 1 else ""
            error = CacheCorruptError(f"{faults[0]}{more}", shard=faults[0].shard, sample_id=faults[0].sample_id,
                                      offset=faults[0].offset, reason=faults[0].reason)
            error.faults = faults
            raise error
        return len(self)

    # -- resources ------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()

    def __getstate__(self) -> dict:
        # File descriptors and locks do not cross process boundaries (DataLoader workers): reopen lazily.
        state = self.__dict__.copy()
        state["_fds"], state["_lock"], state["_order_cache"] = {}, None, (None, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def inspect_cache(cache_dir) -> dict:
    """Summary of a finished cache for ``dspark cache inspect``: target, codecs, counts, sizes, ratio vs raw.

    ``raw_bf16_bytes`` is what the uncompressed reference layout stores for the same tokens: int32 id, uint8
    mask, bf16 ``[L*H]`` features and bf16 ``[H]`` final hidden per token.
    """
    manifest = read_manifest(Path(cache_dir))
    target = manifest["target"]
    L, H = len(target["layer_ids"]), target["hidden_size"]
    tokens, stored = manifest["num_tokens"], manifest["num_bytes"]
    raw = tokens * (4 + 1 + 2 * (L + 1) * H)
    return {
        "path": str(cache_dir),
        "schema_version": manifest["schema_version"],
        "target": target["name"],
        "config_hash": target["config_hash"],
        "layer_ids": target["layer_ids"],
        "hidden_size": H,
        "codec": manifest["codecs"]["features_TLH"],
        "lossless": codecs.get_codec(manifest["codecs"]["features_TLH"]).lossless,
        "zstd_level": manifest["zstd_level"],
        "num_shards": len(manifest["shards"]),
        "num_samples": manifest["num_samples"],
        "num_tokens": tokens,
        "num_bytes": stored,
        "bytes_per_token": stored / tokens if tokens else 0.0,
        "raw_bf16_bytes": raw,
        "ratio_vs_raw_bf16": raw / stored if stored else 0.0,
    }
