"""Streaming reads: seeded shard order + bounded shuffle buffer, rank x loader-worker slices, exact resume from
the stream state, prefetch parity, corrupt samples (error or skip), schema refusal.
"""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_cache_io import assert_same_sample, write_cache

from dspark.cache import CacheCorruptError, CacheReader
from dspark.cache.stream import epoch_order

N = 23  # samples; 3 per shard -> 8 shards, the last one short
SIZES = [3] * 7 + [2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("stream") / "c", range(N))


def ids_of(samples) -> list[str]:
    return [s["id"] for s in samples]


def shard_stream(sizes, seed, epoch) -> list[int]:
    """The shard-ordered stream that feeds the buffer, as documented in dspark.cache.stream."""
    starts = np.concatenate([[0], np.cumsum(sizes)])
    shards = np.random.default_rng([seed, epoch]).permutation(len(sizes)).tolist()
    return [p for s in shards for p in range(starts[s], starts[s + 1])]


def test_epoch_order_is_a_seeded_permutation_with_a_bounded_buffer():
    for buffer in (0, 1, 4, 1024):
        order = epoch_order(SIZES, seed=3, epoch=1, shuffle_buffer=buffer)
        assert sorted(order) == list(range(N))
        assert order == epoch_order(SIZES, seed=3, epoch=1, shuffle_buffer=buffer)
    assert epoch_order(SIZES, 3, 1, 0) == list(range(N))  # 0 = no shuffle
    assert epoch_order(SIZES, 3, 1, 4) != epoch_order(SIZES, 3, 2, 4)
    assert epoch_order(SIZES, 3, 1, 4) != epoch_order(SIZES, 4, 1, 4)
    # Bounded: the i-th sample of the shard-ordered stream enters the buffer at step i - buffer, not earlier.
    stream = shard_stream(SIZES, seed=3, epoch=1)
    for buffer in (1, 4):
        out_index = {p: k for k, p in enumerate(epoch_order(SIZES, 3, 1, buffer))}
        assert all(out_index[p] >= i - buffer for i, p in enumerate(stream))
    with pytest.raises(ValueError, match=r"cache.shuffle_buffer must be >= 0 \(0 = no shuffle\), got -1"):
        epoch_order(SIZES, 0, 0, -1)


def worker_ids(reader, rank, world_size, worker, num_workers, position) -> list[str]:
    stream = reader.stream(7, 2, rank, world_size, num_threads=0, worker=worker, num_workers=num_workers)
    stream.position = position
    return ids_of(stream)


@pytest.mark.parametrize("position", [0, 5])
def test_ranks_and_loader_workers_cover_every_sample_once(cache_dir, position):
    reader = CacheReader(cache_dir, shuffle_buffer=4)
    for world_size in (1, 2, 3):
        covered = []
        for rank in range(world_size):
            rank_ids = [reader.ids[p] for p in reader.stream(7, 2, rank, world_size).rank_order()]
            for num_workers in (1, 2, 3):
                got = [worker_ids(reader, rank, world_size, w, num_workers, position) for w in range(num_workers)]
                flat = [i for ids in got for i in ids]
                assert sorted(flat) == sorted(rank_ids[position:])  # workers: disjoint, complete
                # Round robin over the workers gives back the rank stream (what a DataLoader does).
                interleaved = [ids[k] for k in range(max(map(len, got))) for ids in got if k < len(ids)]
                assert interleaved == rank_ids[position:]
            covered += rank_ids
        assert sorted(covered) == sorted(reader.ids)  # ranks: disjoint, complete
        lengths = [len(reader.sample_order(7, 2, r, world_size)) for r in range(world_size)]
        assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("num_threads,prefetch", [(0, 0), (2, 8)])
def test_resume_from_state_reproduces_the_rest_of_the_epoch(cache_dir, num_threads, prefetch):
    reader = CacheReader(cache_dir, shuffle_buffer=5)
    full = ids_of(reader.stream(11, 4, rank=1, world_size=2, num_threads=num_threads, prefetch=prefetch))
    assert len(full) == 11
    for cut in (0, 3, 7, 11):
        stream = reader.stream(11, 4, rank=1, world_size=2, num_threads=num_threads, prefetch=prefetch)
        it = iter(stream)
        head = [next(it)["id"] for _ in range(cut)]
        state = json.loads(json.dumps(stream.state_dict()))  # goes into a checkpoint as JSON
        assert state["epoch"] == 4 and state["position"] == cut
        it.close()  # the interrupted run dies with samples decoded ahead

        fresh = CacheReader(cache_dir, shuffle_buffer=5).stream(11, 0, rank=1, world_size=2, num_threads=num_threads,
                                                                prefetch=prefetch)
        fresh.load_state_dict(state)
        assert head + ids_of(fresh) == full
        assert fresh.state_dict()["epoch"] == 5 and fresh.state_dict()["position"] == 0  # a finished epoch
    # iter_samples: the trainer's start= keeps its meaning, and state= resumes the same way.
    stream = reader.stream(11, 4, rank=1, world_size=2)
    it = iter(stream)
    [next(it) for _ in range(4)]
    assert ids_of(reader.iter_samples(11, 4, rank=1, world_size=2, start=4)) == full[4:]
    assert ids_of(reader.iter_samples(11, 4, rank=1, world_size=2, state=stream.state_dict())) == full[4:]
    assert ids_of(reader.iter_samples(11, 4, rank=1, world_size=2, num_threads=1, prefetch=1)) == full
    with pytest.raises(ValueError, match="state is for epoch 4, asked for epoch 5"):
        reader.iter_samples(11, 5, rank=1, world_size=2, state=stream.state_dict())


def test_a_state_of_another_order_is_refused(cache_dir, tmp_path):
    reader = CacheReader(cache_dir, shuffle_buffer=5)
    state = reader.stream(11, 0, rank=0, world_size=2).state_dict()
    other = CacheReader(write_cache(tmp_path, range(1, N + 1)), shuffle_buffer=5)  # same size, other samples
    with pytest.raises(ValueError, match=r"different sample order: cache_fingerprint: '[0-9a-f]+' \(state\) vs"):
        other.stream(11, 0, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"different sample order: seed: 11 \(state\) vs 12 \(this stream\); "
                                         r"world_size: 2 \(state\) vs 3 \(this stream\)"):
        reader.stream(12, 0, rank=0, world_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"shuffle_buffer: 5 \(state\) vs 1024"):
        CacheReader(cache_dir).stream(11, 0, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="position 13 is outside this rank's 0..12 samples"):
        reader.stream(11, 0, rank=0, world_size=2).load_state_dict({**state, "position": 13})
    with pytest.raises(ValueError, match="state has version 7, this dspark reads version 1"):
        reader.stream(11, 0).load_state_dict({**state, "version": 7})


def test_dataloader_workers_yield_the_in_process_sequence(cache_dir):
    reader = CacheReader(cache_dir, shuffle_buffer=4)
    expected = ids_of(reader.stream(3, 1, rank=0, world_size=2, num_threads=0))
    for position in (0, 3):
        stream = reader.stream(3, 1, rank=0, world_size=2, num_threads=1, prefetch=2)
        stream.load_state_dict(stream.state_dict(position=position))
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, timeout=120)
        got = list(loader)
        assert ids_of(got) == expected[position:]
        assert_same_sample(got[0], int(expected[position][1:]))


def corrupt_cache(tmp_path, how: str):
    path = write_cache(tmp_path, range(7))
    index = json.loads((path / "shard-00000-00001.idx.json").read_text())
    shard = path / "shard-00000-00001.bin"
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        victim = index["samples"][-1]
        data = data[: victim["offset"] + 5]
    else:
        victim = index["samples"][1]
        data[victim["offset"] + victim["length"] // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    return path, victim


@pytest.mark.parametrize("how,reason", [("truncate", r"shard is truncated \(got 5 of \d+ bytes\)"),
                                        ("flip", r"checksum mismatch")])
def test_corrupt_sample_raises_naming_it_or_is_skipped_and_counted(tmp_path, how, reason):
    path, victim = corrupt_cache(tmp_path, how)
    where = rf"shard-00000-00001.bin: sample '{victim['id']}' at offset {victim['offset']}: {reason}"
    reader = CacheReader(path, shuffle_buffer=0)
    with pytest.raises(CacheCorruptError, match=where):
        list(reader.iter_samples(0, 0, num_threads=2, prefetch=3))
    with pytest.raises(CacheCorruptError, match=where):
        reader.get(victim["id"])

    skipping = CacheReader(path, shuffle_buffer=4, skip_corrupt=True)
    got = ids_of(skipping.iter_samples(0, 0, num_threads=2, prefetch=3))
    assert sorted(got) == sorted(i for i in skipping.ids if i != victim["id"])
    assert skipping.num_skipped == 1
    (skipped,) = skipping.skipped
    assert (skipped.shard, skipped.sample_id, skipped.offset) == ("shard-00000-00001.bin", victim["id"],
                                                                   victim["offset"])
    assert skipped.reason.startswith("shard is truncated" if how == "truncate" else "checksum mismatch")
    for sample_id in got:
        assert_same_sample(skipping.get(sample_id), int(sample_id[1:]))
    with pytest.raises(CacheCorruptError):  # random access never skips
        skipping.get(victim["id"])


def test_unknown_shard_index_schema_and_codec_are_refused_naming_both(tmp_path):
    path = write_cache(tmp_path / "a", range(4))
    index_path = path / "shard-00000-00001.idx.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "schema_version": 3}))
    with pytest.raises(ValueError, match=r"shard-00000-00001.idx.json has cache schema_version 3, but this dspark "
                                         r"reads schema_version 1 or 2"):
        CacheReader(path)

    path = write_cache(tmp_path / "b", range(4))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["codecs"]["features_TLH"] = "fp4"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unknown cache codec 'fp4'; expected one of: bf16, fp8, raw"):
        CacheReader(path)


def test_verify_collects_every_fault(tmp_path):
    path, flipped = corrupt_cache(tmp_path, "flip")
    index = json.loads((path / "shard-00000-00002.idx.json").read_text())
    truncated = index["samples"][0]
    shard = path / "shard-00000-00002.bin"
    shard.write_bytes(shard.read_bytes()[:3])
    with pytest.raises(CacheCorruptError, match=rf"sample '{flipped['id']}' at offset {flipped['offset']}: checksum "
                                                r"mismatch .*\(and 1 more faults\)") as err:
        CacheReader(path).verify()
    assert [(f.shard, f.sample_id) for f in err.value.faults] == [("shard-00000-00001.bin", flipped["id"]),
                                                                  ("shard-00000-00002.bin", truncated["id"])]
    proc = run_cli(["cache", "verify", str(path)])
    assert proc.returncode == 1 and proc.stderr.count("corrupt: ") == 2, proc.stderr
    assert "Error: " in proc.stderr and "Traceback" not in proc.stderr
