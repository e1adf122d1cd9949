"""Hidden-state cache: zstd-compressed shards of target features, a manifest, streaming reads.

Write with ``CacheWriter`` (one per rank) + ``finalize_cache``, or ``build_cache`` from a target backend;
read with ``CacheReader`` (random access) and its ``stream`` (resumable epochs). Layout and checksums:
``dspark.cache.format``; size projections (no torch needed): ``dspark.cache.estimate``.

Names are imported lazily so that ``dspark cache estimate`` and ``inspect`` do not pay for importing torch.
"""

import importlib

_EXPORTS = {
    "SCHEMA_VERSION": "dspark.cache.format",
    "CacheCorruptError": "dspark.cache.format",
    "CacheReader": "dspark.cache.reader",
    "CacheStream": "dspark.cache.stream",
    "CacheWriter": "dspark.cache.writer",
    "build_cache": "dspark.cache.build",
    "finalize_cache": "dspark.cache.writer",
    "inspect_cache": "dspark.cache.reader",
}

__all__ = ["SCHEMA_VERSION", "CacheCorruptError", "CacheReader", "CacheStream", "CacheWriter", "build_cache",
           "finalize_cache", "inspect_cache"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dspark.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
