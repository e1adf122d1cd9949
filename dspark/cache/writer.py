"""Append-only, crash-safe cache writing: ``CacheWriter`` per rank, then one ``finalize_cache``.

Legend: T tokens, L feature layers, H hidden size.

Samples are encoded (bf16 cast, byte planes or fp8, zstd) on a pool of ``num_threads`` threads
(``cache.compress_threads``) while the caller keeps capturing: ``add`` only copies the tensors to CPU and queues
them. A single background thread writes full shards in order; ``add`` blocks only when more than
``_MAX_PENDING_SHARDS`` full shards wait for it (bounds memory when compression is slower than capture).
A shard becomes visible only after its data and index are fsynced and renamed (index first, data last), so a
killed build leaves finished shards plus at most some hidden temp files, which the next writer of that rank
deletes. ``done_ids`` lets a resumed build skip what is already on disk.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch

from dspark.cache import codecs
from dspark.cache.format import (
    CHECKSUM_ALGORITHM,
    FIELDS,
    FORMAT_NAME,
    ID_MASK_CODECS,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    CacheCorruptError,
    checksum,
    content_hash,
    finished_shards,
    fsync_dir,
    index_name,
    new_hasher,
    read_shard_index,
    shard_name,
    write_json_atomic,
)
from dspark.targets.base import TargetIdentity

# How many full shards may wait for the writer thread before ``add`` blocks (bounds memory).
_MAX_PENDING_SHARDS = 2


@dataclass
class _Record:
    sample_id: str
    num_tokens: int
    blobs: list[bytes]  # one per FIELDS entry
    content: str  # content_hash of the ids and mask


def _field_codecs(codec: str) -> dict[str, str]:
    return {**ID_MASK_CODECS, "features_TLH": codec, "final_TH": codec}


class CacheWriter:
    """Writes samples of one rank into ``out_dir`` as shards of ``samples_per_shard`` samples.

    A sample is a dict: ``id`` (str), ``input_ids`` long ``[T]``, ``loss_mask`` bool ``[T]``, ``features_TLH``
    ``[T, L, H]`` and ``final_TH`` ``[T, H]`` (any float dtype; stored as bf16). ``add`` returns False for an
    id already in a finished shard (resume). Call ``close`` (or use as a context manager) to flush the last,
    possibly short, shard; nothing becomes visible before its shard is complete. A sample that fails to
    encode (e.g. inf/nan with the fp8 codec) raises from a later ``add`` or from ``close``, naming its id.
    """

    def __init__(self, out_dir, identity: TargetIdentity, codec: str = "bf16", zstd_level: int = 3,
                 samples_per_shard: int = 64, rank: int = 0, num_threads: int = 2):
        self.codec = codecs.get_codec(codec)
        codecs.check_zstd_level(zstd_level)
        if samples_per_shard < 1:
            raise ValueError(f"cache.samples_per_shard must be >= 1, got {samples_per_shard}")
        if not 0 <= rank < 100_000:
            raise ValueError(f"writer rank must be in 0..99999, got {rank}")
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"cache.compress_threads must be an integer >= 1, got {num_threads!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.zstd_level = zstd_level
        self.samples_per_shard = samples_per_shard
        self.rank = rank
        self._num_layers = len(identity.layer_ids)

        self._remove_own_temp_files()
        self.done_contents, next_index = self._scan_finished()
        self.done_ids = set(self.done_contents)
        self._next_index = next_index
        self._written_ids: set[str] = set()  # ids added by this writer (pending or written)
        self._current: list[Future] = []
        self._pending_shards: list[Future] = []
        self._encode_pool = ThreadPoolExecutor(num_threads, thread_name_prefix="cache-encode")
        self._shard_pool = ThreadPoolExecutor(1, thread_name_prefix="cache-shard")
        self._closed = False

    @classmethod
    def from_config(cls, out_dir, identity: TargetIdentity, cfg, rank: int = 0) -> CacheWriter:
        """A writer with the codec, zstd level, shard size and compression threads of ``cfg`` (a CacheConfig)."""
        return cls(out_dir, identity, codec=cfg.codec, zstd_level=cfg.zstd_level,
                   samples_per_shard=cfg.samples_per_shard, rank=rank, num_threads=cfg.compress_threads)

    # -- setup ----------------------------------------------------------------------------------------------

    def _remove_own_temp_files(self) -> None:
        # Temp files of this rank are left only by a killed writer of this rank; other ranks may be live.
        prefix = f".shard-{self.rank:05d}-"
        for name in os.listdir(self.out_dir):
            if name.startswith(prefix) and name.endswith(".tmp"):
                os.remove(self.out_dir / name)

    def _scan_finished(self) -> tuple[dict[str, str | None], int]:
        """{id: content hash (None in a schema-1 shard)} of finished shards of every rank, and this rank's next
        shard index."""
        done: dict[str, str | None] = {}
        next_index = 0
        for rank, index, name in finished_shards(self.out_dir):
            shard_index = read_shard_index(self.out_dir, name)
            bad = self.identity.mismatches(shard_index["target"])
            if bad:
                raise ValueError(
                    f"{self.out_dir} already holds shards for a different target ({name}): {'; '.join(bad)}"
                )
            if rank == self.rank:
                if shard_index["codecs"] != _field_codecs(self.codec.name):
                    raise ValueError(
                        f"{self.out_dir / name} uses codecs {shard_index['codecs']}, this writer "
                        f"{_field_codecs(self.codec.name)}; resume with the same cache.codec"
                    )
                next_index = max(next_index, index + 1)
            done.update((entry["id"], entry.get("content")) for entry in shard_index["samples"])
        return done, next_index

    # -- writing --------------------------------------------------------------------------------------------

    def add(self, sample: dict) -> bool:
        """Queue one sample; False (and nothing written) when its id is already in a finished shard."""
        if self._closed:
            raise ValueError("CacheWriter.add after close")
        self._raise_failed()
        sample_id, tensors = self._validate(sample)
        if sample_id in self.done_ids:
            return False
        if sample_id in self._written_ids:
            raise ValueError(f"sample id {sample_id!r} was added twice to the cache writer")
        self._written_ids.add(sample_id)
        self._current.append(self._encode_pool.submit(self._encode, sample_id, *tensors))
        if len(self._current) == self.samples_per_shard:
            self._flush_shard()
        return True

    def _validate(self, sample: dict) -> tuple[str, tuple[torch.Tensor, ...]]:
        missing = [key for key in ("id", *FIELDS) if key not in sample]
        if missing:
            raise ValueError(f"cache sample is missing {missing}; expected keys id, {', '.join(FIELDS)}")
        sample_id = sample["id"]
        if not isinstance(sample_id, str) or not sample_id:
            raise ValueError(f"cache sample id must be a non-empty str, got {sample_id!r}")
        not_tensors = [key for key in FIELDS if not isinstance(sample[key], torch.Tensor)]
        if not_tensors:
            raise ValueError(f"cache sample {sample_id!r}: {not_tensors} must be torch tensors")
        ids_T, mask_T = sample["input_ids"], sample["loss_mask"]
        feats_TLH, final_TH = sample["features_TLH"], sample["final_TH"]
        if ids_T.dim() != 1:
            raise ValueError(f"cache sample {sample_id!r}: input_ids must be 1-D [T], got shape {list(ids_T.shape)}")
        T, L, H = ids_T.shape[0], self._num_layers, self.identity.hidden_size
        expected = {"input_ids": (T,), "loss_mask": (T,), "features_TLH": (T, L, H), "final_TH": (T, H)}
        for key, value in zip(FIELDS, (ids_T, mask_T, feats_TLH, final_TH)):
            if tuple(value.shape) != expected[key]:
                raise ValueError(
                    f"cache sample {sample_id!r}: {key} has shape {list(value.shape)}, expected {list(expected[key])} "
                    f"(T={T} tokens, L={L} layer ids {self.identity.layer_ids}, H={H})"
                )
        if T == 0:
            raise ValueError(f"cache sample {sample_id!r} has no tokens")
        if ids_T.is_floating_point() or int(ids_T.min()) < 0 or int(ids_T.max()) >= self.identity.vocab_size:
            raise ValueError(
                f"cache sample {sample_id!r}: input_ids must be integers in [0, {self.identity.vocab_size}) "
                f"(the target's vocab size), got dtype {ids_T.dtype}, range [{ids_T.min()}, {ids_T.max()}]"
            )
        # Copies: the caller may reuse its buffers while encoding runs on another thread.
        to_bf16 = {"device": "cpu", "dtype": torch.bfloat16, "copy": True}
        return sample_id, (
            ids_T.detach().to("cpu", torch.long, copy=True),
            mask_T.detach().to("cpu").bool(),
            feats_TLH.detach().to(**to_bf16),
            final_TH.detach().to(**to_bf16),
        )

    def _encode(self, sample_id, ids_T, mask_T, feats_TLH, final_TH) -> _Record:
        blobs = [codecs.encode_ids(ids_T), codecs.encode_mask(mask_T)]
        for key, value in (("features_TLH", feats_TLH), ("final_TH", final_TH)):
            try:
                blobs.append(self.codec.encode(value, self.zstd_level))
            except ValueError as exc:
                raise ValueError(f"cache sample {sample_id!r}: {key}: {exc}") from exc
        return _Record(sample_id, ids_T.shape[0], blobs, content_hash(ids_T.tolist(), mask_T.int().tolist()))

    def _flush_shard(self) -> None:
        if not self._current:
            return
        records, self._current = self._current, []
        index = self._next_index
        self._next_index += 1
        self._pending_shards.append(self._shard_pool.submit(self._write_shard, index, records))
        while len(self._pending_shards) > _MAX_PENDING_SHARDS:
            self._pending_shards.pop(0).result()

    def _write_shard(self, index: int, record_futures: list[Future]) -> None:
        name = shard_name(self.rank, index)
        tmp_bin = self.out_dir / f".{name}.tmp"
        file_hasher = new_hasher()
        entries, offset = [], 0
        with open(tmp_bin, "wb") as f:
            for future in record_futures:
                record: _Record = future.result()
                payload = b"".join(record.blobs)
                f.write(payload)
                file_hasher.update(payload)
                entries.append({
                    "id": record.sample_id,
                    "offset": offset,
                    "length": len(payload),
                    "num_tokens": record.num_tokens,
                    "checksum": checksum(payload),
                    "field_lengths": [len(blob) for blob in record.blobs],
                    "content": record.content,
                })
                offset += len(payload)
            f.flush()
            os.fsync(f.fileno())
        shard_index = {
            "schema_version": SCHEMA_VERSION,
            "rank": self.rank,
            "shard": index,
            "target": self.identity.to_dict(),
            "codecs": _field_codecs(self.codec.name),
            "zstd_level": self.zstd_level,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "num_samples": len(entries),
            "num_tokens": sum(e["num_tokens"] for e in entries),
            "num_bytes": offset,
            "checksum": file_hasher.hexdigest(),
            "samples": entries,
        }
        # Index first, data last: a visible .bin always has its index.
        tmp_idx = write_json_atomic(self.out_dir / index_name(name), shard_index, rename=False)
        os.replace(tmp_idx, self.out_dir / index_name(name))
        os.replace(tmp_bin, self.out_dir / name)
        fsync_dir(self.out_dir)

    def _raise_failed(self) -> None:
        for future in (*self._current, *self._pending_shards):
            if future.done() and future.exception() is not None:
                raise future.exception()

    def close(self) -> None:
        """Write the last (short) shard and wait for every pending write; re-raises a failed write."""
        if self._closed:
            return
        self._closed = True
        try:
            self._flush_shard()
            for future in self._pending_shards:
                future.result()
        finally:
            self._encode_pool.shutdown(wait=True)
            self._shard_pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # A failing capture must not publish a partial last shard; finished shards stay for resuming.
            self._closed = True
            self._current = []
            self._encode_pool.shutdown(wait=True)
            self._shard_pool.shutdown(wait=True)


def finalize_cache(out_dir, identity: TargetIdentity) -> Path:
    """Scan the finished shards of all ranks and write ``manifest.json`` atomically; returns its path.

    Refuses shards written for another target, mixed codecs, duplicate sample ids, and shards whose size
    differs from their index.
    """
    out_dir = Path(out_dir)
    shards, codecs_seen, levels, seen_ids = [], None, set(), {}
    for rank, index, name in finished_shards(out_dir):
        shard_index = read_shard_index(out_dir, name)
        bad = identity.mismatches(shard_index["target"])
        if bad:
            raise ValueError(f"{out_dir / name} was written for a different target: {'; '.join(bad)}")
        if codecs_seen is not None and shard_index["codecs"] != codecs_seen:
            raise ValueError(f"{out_dir / name} uses codecs {shard_index['codecs']}, earlier shards {codecs_seen}")
        codecs_seen = shard_index["codecs"]
        levels.add(shard_index["zstd_level"])
        size = os.path.getsize(out_dir / name)
        if size != shard_index["num_bytes"]:
            raise CacheCorruptError(f"{out_dir / name} is {size} bytes, its index says {shard_index['num_bytes']}")
        for entry in shard_index["samples"]:
            if entry["id"] in seen_ids:
                raise ValueError(f"sample id {entry['id']!r} is in both {seen_ids[entry['id']]} and {name}")
            seen_ids[entry["id"]] = name
        shards.append({
            "file": name,
            "index_file": index_name(name),
            "rank": rank,
            "shard": index,
            **{key: shard_index[key] for key in ("num_samples", "num_tokens", "num_bytes", "checksum")},
        })
    manifest = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "target": identity.to_dict(),
        "codecs": codecs_seen or _field_codecs("bf16"),
        # Decoding never needs the level; several ranks may have used different ones.
        "zstd_level": levels.pop() if len(levels) == 1 else sorted(levels),
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_bytes": sum(s["num_bytes"] for s in shards),
        "shards": shards,
    }
    path = out_dir / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


__all__ = ["CacheWriter", "finalize_cache"]
