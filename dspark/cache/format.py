"""On-disk layout of a hidden-state cache: names, schema version, checksums, manifest and shard index I/O.

A cache is a directory::

    manifest.json                    written once by ``finalize_cache`` (atomic rename)
    shard-RRRRR-NNNNN.bin            concatenated sample records of writer rank R, shard N
    shard-RRRRR-NNNNN.idx.json       that shard's index (written and renamed *before* the .bin)

A shard is finished (visible) iff its ``.bin`` exists: the writer fsyncs and renames the index first and the
data file last, so a visible ``.bin`` always has its index. Temp files start with ``.`` and end in ``.tmp``.

One sample record is its fields' encoded blobs back to back, in ``FIELDS`` order; the index entry keeps each
field's length. Checksums are BLAKE2b with a 16-byte digest (``hashlib.blake2b(digest_size=16)``), hex:
per sample over the record's stored bytes, per shard over the whole ``.bin`` file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

# 2: index entries carry ``content`` (``content_hash`` of the sample's token ids and loss mask), so a resumed
# build refuses a cache made from other conversations. Schema 1 caches stay readable for training.
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
FORMAT_NAME = "dspark-hidden-state-cache"
MANIFEST_NAME = "manifest.json"
CHECKSUM_ALGORITHM = "blake2b-128"

# Record field order. input_ids and loss_mask are tiny next to the features and are stored uncompressed.
FIELDS = ("input_ids", "loss_mask", "features_TLH", "final_TH")
ID_MASK_CODECS = {"input_ids": "int32", "loss_mask": "uint8"}

_SHARD_RE = re.compile(r"^shard-(\d{5})-(\d{5})\.bin$")


class CacheCorruptError(ValueError):
    """Stored bytes do not match their checksum, or a shard is shorter than its index says.

    When one sample is at fault, ``shard``, ``sample_id``, ``offset`` and ``reason`` say which (the message
    names them too); they are None for faults of a whole shard or index.
    """

    def __init__(self, message: str, *, shard: str | None = None, sample_id: str | None = None,
                 offset: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.shard, self.sample_id, self.offset, self.reason = shard, sample_id, offset, reason

    def __reduce__(self):
        # Keep the fields when the error crosses a process boundary (DataLoader workers).
        return _rebuild_corrupt_error, (str(self), self.shard, self.sample_id, self.offset, self.reason)


def _rebuild_corrupt_error(message, shard, sample_id, offset, reason) -> CacheCorruptError:
    return CacheCorruptError(message, shard=shard, sample_id=sample_id, offset=offset, reason=reason)


def new_hasher():
    """The checksum used everywhere in the cache (see ``CHECKSUM_ALGORITHM``)."""
    return hashlib.blake2b(digest_size=16)


def checksum(data: bytes | memoryview) -> str:
    hasher = new_hasher()
    hasher.update(data)
    return hasher.hexdigest()


def shard_name(rank: int, index: int) -> str:
    return f"shard-{rank:05d}-{index:05d}.bin"


def index_name(shard: str) -> str:
    return shard[: -len(".bin")] + ".idx.json"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(rank, shard index) of a finished shard file name, None for anything else."""
    match = _SHARD_RE.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def finished_shards(cache_dir: Path) -> list[tuple[int, int, str]]:
    """(rank, index, file name) of every finished shard in ``cache_dir``, sorted by rank then index."""
    found = []
    for entry in os.listdir(cache_dir):
        parsed = parse_shard_name(entry)
        if parsed is not None:
            found.append((*parsed, entry))
    return sorted(found)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict, *, rename: bool = True) -> Path:
    """Write ``data`` to a hidden temp file next to ``path`` and fsync it; rename into place if ``rename``.

    Returns the temp path when ``rename`` is False so the caller can order several renames itself.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if rename:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    return tmp


def read_shard_index(cache_dir: Path, shard: str) -> dict:
    """Load and sanity-check one shard's index; a missing or unreadable index is corruption."""
    path = cache_dir / index_name(shard)
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise CacheCorruptError(f"{cache_dir / shard}: its index {path.name} is missing") from None
    except json.JSONDecodeError as exc:
        raise CacheCorruptError(f"{path}: unreadable shard index ({exc})") from None
    check_schema_version(index.get("schema_version"), path)
    return index


def check_schema_version(found, where: Path) -> None:
    if found not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"{where} has cache schema_version {found!r}, but this dspark reads schema_version "
            f"{' or '.join(map(str, READABLE_SCHEMA_VERSIONS))}; rebuild the cache or use the dspark version that "
            f"wrote it"
        )


def content_hash(input_ids: list[int], loss_mask: list[int]) -> str:
    """Hash of a sample's content (token ids and loss mask), kept per sample in the shard index: a resumed build
    compares it with the conversations it is given, so a cache is never reused for changed data."""
    h = new_hasher()
    h.update(json.dumps([list(map(int, input_ids)), list(map(int, loss_mask))], separators=(",", ":")).encode())
    return h.hexdigest()


def remove_cache_files(cache_dir: Path) -> int:
    """Delete the cache files in ``cache_dir`` (manifest, shards, indexes, temp files; nothing else); returns
    how many."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return 0
    names = [n for n in os.listdir(cache_dir) if n == MANIFEST_NAME or n.startswith(("shard-", ".shard-"))]
    for name in names:
        os.remove(cache_dir / name)
    return len(names)


def read_manifest(cache_dir: Path) -> dict:
    """Load ``manifest.json`` and refuse schema versions this code does not understand."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(
            f"{cache_dir} is not a finished cache: {MANIFEST_NAME} is missing "
            f"(finish the build, or run finalize_cache on it)"
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a dspark cache manifest (format {manifest.get('format')!r})")
    check_schema_version(manifest.get("schema_version"), path)
    return manifest
