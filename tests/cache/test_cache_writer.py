"""The writer compresses on background threads: ``add`` never waits for a codec (until the shard backlog is full)."""

import threading

import pytest
from test_cache_io import assert_same_sample, make_identity, make_sample

from dspark.cache import CacheReader, CacheWriter, finalize_cache, writer
from dspark.config import CacheConfig


class GatedCodec:
    """The bf16 codec, but every encode waits until the test opens the gate, and records its thread."""

    name, lossless = "bf16", True

    def __init__(self):
        from dspark.cache.codecs import get_codec

        self.inner, self.threads = get_codec("bf16"), set()
        self.gate, self.entered = threading.Event(), threading.Event()

    def encode(self, x, level):
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        return self.inner.encode(x, level)


def test_add_returns_while_compression_is_still_blocked(tmp_path):
    cfg = CacheConfig(samples_per_shard=2, compress_threads=3, zstd_level=4)
    w = CacheWriter.from_config(tmp_path, make_identity(), cfg)
    assert w._encode_pool._max_workers == 3 and w.zstd_level == 4 and w.samples_per_shard == 2
    w.codec = gated = GatedCodec()
    # Two full shards are queued behind the gate (the pending-shard bound is 2): capture has not waited yet.
    for i in range(2 * writer._MAX_PENDING_SHARDS):
        assert w.add(make_sample(i))
    assert gated.entered.wait(timeout=60) and not gated.gate.is_set()
    assert all(name.startswith("cache-encode") for name in gated.threads)  # never the caller's thread
    gated.gate.set()
    w.close()
    finalize_cache(tmp_path, make_identity())
    reader = CacheReader(tmp_path)
    for i in range(2 * writer._MAX_PENDING_SHARDS):
        assert_same_sample(reader.get(f"s{i:03d}"), i)


def test_compress_threads_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="cache.compress_threads must be an integer >= 1, got 0"):
        CacheWriter.from_config(tmp_path, make_identity(), CacheConfig(compress_threads=0))
