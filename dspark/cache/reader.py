"""Reading a finished cache: identity checks, random access by id, seeded rank-sliced iteration.

Legend: T tokens, L feature layers, H hidden size.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

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
from dspark.targets.base import TargetIdentity


class CacheReader:
    """A finished cache directory, opened read-only.

    ``expected``: the target the caller trains against; a cache built for a different one (config hash,
    layer ids, hidden size, vocab size, tokenizer) is refused. Samples come back as dicts with ``id``,
    ``input_ids`` long ``[T]``, ``loss_mask`` bool ``[T]``, ``features_TLH`` bf16 ``[T, L, H]`` and
    ``final_TH`` bf16 ``[T, H]``. Every read checks the sample's checksum (``CacheCorruptError`` on failure).
    """

    def __init__(self, cache_dir, expected: TargetIdentity | None = None):
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
        for shard in self.manifest["shards"]:
            shard_index = read_shard_index(self.cache_dir, shard["file"])
            if shard_index["checksum"] != shard["checksum"] or len(shard_index["samples"]) != shard["num_samples"]:
                raise CacheCorruptError(
                    f"{self.cache_dir / shard['file']}: its index does not match manifest.json "
                    f"(shard rewritten after finalize?)"
                )
            self._entries.extend((shard["file"], entry) for entry in shard_index["samples"])
        self._position = {entry["id"]: i for i, (_, entry) in enumerate(self._entries)}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

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
        data = os.pread(self._fd(shard), entry["length"], entry["offset"])  # pread: thread-safe, no seek state
        if len(data) != entry["length"]:
            raise CacheCorruptError(
                f"{where}: shard is truncated (got {len(data)} of {entry['length']} bytes)"
            )
        if checksum(data) != entry["checksum"]:
            raise CacheCorruptError(f"{where}: checksum mismatch (stored bytes are corrupt)")
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
            raise CacheCorruptError(f"{where}: cannot decode ({exc})") from exc
        assert set(sample) == {"id", *FIELDS}
        return sample

    # -- iteration ------------------------------------------------------------------------------------------

    def sample_order(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                     shuffle: bool = True) -> list[int]:
        """Positions this rank reads in ``epoch``: one permutation seeded by (seed, epoch), strided by rank.

        Ranks' slices are disjoint and together cover every sample once; their lengths differ by at most one.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(len(self)).tolist()
        else:
            order = list(range(len(self)))
        return order[rank::world_size]

    def iter_samples(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                     *, start: int = 0, num_threads: int = 2, prefetch: int = 8) -> Iterator[dict]:
        """Yield this rank's samples for ``epoch`` in a deterministic order, decoding ahead on threads.

        ``start`` skips the first ``start`` samples of this rank's slice (resuming mid-epoch).
        """
        order = self.sample_order(seed, epoch, rank, world_size, shuffle)[start:]
        if num_threads <= 0:
            yield from (self._read(i) for i in order)
            return
        pool = ThreadPoolExecutor(num_threads, thread_name_prefix="cache-read")
        try:
            ahead: deque = deque()
            for position in order:
                ahead.append(pool.submit(self._read, position))
                if len(ahead) > prefetch:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- integrity ------------------------------------------------------------------------------------------

    def verify(self) -> int:
        """Check every shard's size and whole-file checksum; returns the number of samples checked.

        On a bad shard, reads its samples one by one so the error names the first corrupt sample.
        """
        for shard in self.manifest["shards"]:
            path = self.cache_dir / shard["file"]
            hasher, size = new_hasher(), 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    hasher.update(chunk)
                    size += len(chunk)
            if size == shard["num_bytes"] and hasher.hexdigest() == shard["checksum"]:
                continue
            for position, (name, _) in enumerate(self._entries):
                if name == shard["file"]:
                    self._read(position)  # raises with the sample id and offset
            raise CacheCorruptError(f"{path}: file checksum or size differs from manifest.json "
                                    f"({size} bytes, manifest says {shard['num_bytes']})")
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
        state["_fds"], state["_lock"] = {}, None
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
        "zstd_level": manifest["zstd_level"],
        "num_shards": len(manifest["shards"]),
        "num_samples": manifest["num_samples"],
        "num_tokens": tokens,
        "num_bytes": stored,
        "bytes_per_token": stored / tokens if tokens else 0.0,
        "raw_bf16_bytes": raw,
        "ratio_vs_raw_bf16": raw / stored if stored else 0.0,
    }
