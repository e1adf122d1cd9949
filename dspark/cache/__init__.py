"""Hidden-state cache: zstd-compressed shards of target features, a manifest, streaming reads.

Write with ``CacheWriter`` (one per rank) + ``finalize_cache``, or ``build_cache`` from a target backend;
read with ``CacheReader``. Layout and checksums: ``dspark.cache.format``.
"""

from dspark.cache.build import build_cache
from dspark.cache.format import SCHEMA_VERSION, CacheCorruptError
from dspark.cache.reader import CacheReader, inspect_cache
from dspark.cache.writer import CacheWriter, finalize_cache

__all__ = ["SCHEMA_VERSION", "CacheCorruptError", "CacheReader", "CacheWriter", "build_cache",
           "finalize_cache", "inspect_cache"]
