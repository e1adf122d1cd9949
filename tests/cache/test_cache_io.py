"""Writer / reader on synthetic samples: round trips, crash-safe resume, corruption, identity, ordering.

Legend: T tokens, L feature layers, H hidden size.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark.cache import CacheCorruptError, CacheReader, CacheWriter, finalize_cache, inspect_cache
from dspark.cache.format import checksum, finished_shards
from dspark.targets.base import TargetIdentity

L, H = 2, 16


def make_identity(**changes) -> TargetIdentity:
    fields = dict(name="toy", config_hash="abc123", layer_ids=[0, 2], hidden_size=H, vocab_size=1000, num_layers=4,
                  tokenizer_hash="tok1", chat_template=None)
    return TargetIdentity(**{**fields, **changes})


def make_sample(i: int) -> dict:
    """Deterministic fp32 sample ``i`` with 3 + i % 7 tokens."""
    g = torch.Generator().manual_seed(i)
    T = 3 + i % 7
    return {
        "id": f"s{i:03d}",
        "input_ids": torch.randint(0, 1000, (T,), generator=g),
        "loss_mask": torch.rand(T, generator=g) > 0.5,
        "features_TLH": torch.randn(T, L, H, generator=g) * 4,
        "final_TH": torch.randn(T, H, generator=g),
    }


def write_cache(path: Path, ids, identity=None, **kwargs) -> Path:
    identity = identity or make_identity()
    with CacheWriter(path, identity, **{"samples_per_shard": 3, **kwargs}) as writer:
        for i in ids:
            writer.add(make_sample(i))
    finalize_cache(path, identity)
    return path


def assert_same_sample(got: dict, i: int) -> None:
    want = make_sample(i)
    assert got["id"] == want["id"]
    assert torch.equal(got["input_ids"], want["input_ids"]) and got["input_ids"].dtype == torch.long
    assert torch.equal(got["loss_mask"], want["loss_mask"]) and got["loss_mask"].dtype == torch.bool
    for key in ("features_TLH", "final_TH"):
        assert got[key].dtype == torch.bfloat16
        # Bit-identical to casting what was written.
        assert torch.equal(got[key].view(torch.int16), want[key].to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("codec", ["bf16", "raw"])
def test_round_trip_manifest_and_random_access(tmp_path, codec):
    path = write_cache(tmp_path / "c", range(10), codec=codec, zstd_level=5)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["schema_version"] == 2 and manifest["target"] == make_identity().to_dict()
    assert manifest["codecs"] == {"input_ids": "int32", "loss_mask": "uint8", "features_TLH": codec, "final_TH": codec}
    assert manifest["zstd_level"] == 5
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert manifest["num_tokens"] == sum(make_sample(i)["input_ids"].numel() for i in range(10))
    for shard in manifest["shards"]:
        data = (path / shard["file"]).read_bytes()
        assert len(data) == shard["num_bytes"] and checksum(data) == shard["checksum"]
    assert sorted(os.listdir(path))[:2] == ["manifest.json", "shard-00000-00000.bin"]

    reader = CacheReader(path, expected=make_identity())
    assert len(reader) == 10
    for i in (7, 0, 9, 3):
        assert_same_sample(reader.get(f"s{i:03d}"), i)
        assert_same_sample(reader[i], i)
    assert_same_sample(reader[-1], 9)
    assert reader.verify() == 10
    with pytest.raises(KeyError, match="sample id 'nope' is not in cache"):
        reader.get("nope")
    assert_same_sample(pickle.loads(pickle.dumps(reader)).get("s004"), 4)  # DataLoader workers

    info = inspect_cache(path)
    assert info["num_samples"] == 10 and info["codec"] == codec and info["layer_ids"] == [0, 2]
    assert info["bytes_per_token"] == info["num_bytes"] / info["num_tokens"]
    if codec == "raw":  # raw stores exactly the reference layout's bytes
        assert info["ratio_vs_raw_bf16"] == 1.0


def test_partial_shard_is_invisible_until_close(tmp_path):
    writer = CacheWriter(tmp_path, make_identity(), samples_per_shard=4)
    for i in range(6):
        writer.add(make_sample(i))
    writer._pending_shards[0].result()  # the full shard is on disk; the short one is still in memory
    assert [name for *_, name in finished_shards(tmp_path)] == ["shard-00000-00000.bin"]
    writer.close()
    assert [name for *_, name in finished_shards(tmp_path)] == ["shard-00000-00000.bin", "shard-00000-00001.bin"]


def test_resume_after_abandoned_temp_files_has_no_duplicates_or_gaps(tmp_path):
    identity = make_identity()
    with CacheWriter(tmp_path, identity, samples_per_shard=3) as writer:
        for i in range(6):
            writer.add(make_sample(i))
    # What a kill leaves: temp files of an unfinished shard, or an index renamed just before its data.
    (tmp_path / ".shard-00000-00002.bin.tmp").write_bytes(b"partial")
    (tmp_path / ".shard-00000-00002.idx.json.tmp").write_text("{")
    (tmp_path / "shard-00000-00003.idx.json").write_text("{}")
    (tmp_path / ".shard-00001-00000.bin.tmp").write_bytes(b"another rank, still writing")

    writer = CacheWriter(tmp_path, identity, samples_per_shard=3)
    assert writer.done_ids == {f"s{i:03d}" for i in range(6)}
    added = [writer.add(make_sample(i)) for i in range(11)]
    writer.close()
    assert added == [False] * 6 + [True] * 5
    assert not (tmp_path / ".shard-00000-00002.bin.tmp").exists()
    assert (tmp_path / ".shard-00001-00000.bin.tmp").exists()  # other ranks' temp files are not ours
    finalize_cache(tmp_path, identity)
    reader = CacheReader(tmp_path)
    assert sorted(reader.ids) == [f"s{i:03d}" for i in range(11)]
    for i in range(11):
        assert_same_sample(reader.get(f"s{i:03d}"), i)


KILLED_WRITER = """
import os, sys
sys.path.insert(0, {tests!r})
from test_cache_io import make_identity, make_sample
from dspark.cache import CacheWriter
writer = CacheWriter({path!r}, make_identity(), samples_per_shard=2)
for i in range(9):
    writer.add(make_sample(i))
writer._pending_shards[1].result()
os._exit(1)  # killed: no close, shard writes may be in flight
"""


def test_killed_process_resumes_without_duplicates_or_gaps(tmp_path):
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), path=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    writer = CacheWriter(tmp_path, make_identity(), samples_per_shard=2)
    assert {f"s{i:03d}" for i in range(4)} <= writer.done_ids <= {f"s{i:03d}" for i in range(8)}
    for i in range(12):
        writer.add(make_sample(i))
    writer.close()
    finalize_cache(tmp_path, make_identity())
    reader = CacheReader(tmp_path)
    assert sorted(reader.ids) == [f"s{i:03d}" for i in range(12)]
    assert reader.verify() == 12


def test_flipped_byte_names_shard_sample_and_offset(tmp_path):
    path = write_cache(tmp_path, range(7))
    reader = CacheReader(path)
    index = json.loads((path / "shard-00000-00001.idx.json").read_text())
    victim = index["samples"][1]
    shard = path / "shard-00000-00001.bin"
    data = bytearray(shard.read_bytes())
    data[victim["offset"] + victim["length"] // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    message = f"shard-00000-00001.bin: sample '{victim['id']}' at offset {victim['offset']}: checksum mismatch"
    with pytest.raises(CacheCorruptError, match=message):
        reader.get(victim["id"])
    with pytest.raises(CacheCorruptError, match=message):
        reader.verify()
    assert_same_sample(reader.get("s003"), 3)  # the shard's other samples are fine
    assert issubclass(CacheCorruptError, ValueError)


def test_truncated_shard_is_a_clear_error(tmp_path):
    path = write_cache(tmp_path, range(6))
    index = json.loads((path / "shard-00000-00001.idx.json").read_text())
    last = index["samples"][-1]
    shard = path / "shard-00000-00001.bin"
    shard.write_bytes(shard.read_bytes()[: last["offset"] + 5])
    reader = CacheReader(path)
    with pytest.raises(CacheCorruptError, match=rf"shard-00000-00001.bin: sample '{last['id']}' at offset "
                                                rf"{last['offset']}: shard is truncated \(got 5 of"):
        reader.get(last["id"])
    with pytest.raises(CacheCorruptError, match="shard-00000-00001.bin is .* bytes, its index says"):
        finalize_cache(path, make_identity())


def test_mismatched_target_is_refused_naming_both_sides(tmp_path):
    path = write_cache(tmp_path, range(2))
    other = make_identity(name="other", layer_ids=[1, 2], hidden_size=32)
    with pytest.raises(ValueError) as err:
        CacheReader(path, expected=other)
    message = str(err.value)
    assert "\n" not in message and "was built for a different target" in message
    assert "layer_ids: [0, 2] (cache) vs [1, 2] (target other)" in message
    assert "hidden_size: 16 (cache) vs 32 (target other)" in message
    with pytest.raises(ValueError, match=r"tokenizer_hash: 'tok1' \(cache\) vs 'tok2'"):
        CacheReader(path, expected=make_identity(tokenizer_hash="tok2"))
    CacheReader(path, expected=make_identity(name="renamed", chat_template="x"))  # informative fields only
    # Resuming a build into a cache of another target is refused too.
    with pytest.raises(ValueError, match="already holds shards for a different target"):
        CacheWriter(path, make_identity(config_hash="zzz"))
    with pytest.raises(ValueError, match="resume with the same cache.codec"):
        CacheWriter(path, make_identity(), codec="raw")


def test_unknown_schema_version_is_refused(tmp_path):
    path = write_cache(tmp_path, range(2))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="has cache schema_version 99, but this dspark reads schema_version 1 or 2"):
        CacheReader(path)
    with pytest.raises(ValueError, match="manifest.json is missing"):
        CacheReader(tmp_path / "nothing")


def test_rank_slices_are_disjoint_complete_and_seeded(tmp_path):
    reader = CacheReader(write_cache(tmp_path, range(11)))
    for world_size in (1, 2, 3, 4):
        slices = [reader.sample_order(seed=5, epoch=1, rank=r, world_size=world_size) for r in range(world_size)]
        flat = [i for s in slices for i in s]
        assert sorted(flat) == list(range(11))  # disjoint and complete
        assert max(map(len, slices)) - min(map(len, slices)) <= 1
    assert reader.sample_order(5, 1) == reader.sample_order(5, 1)
    assert reader.sample_order(5, 1) != reader.sample_order(5, 2)
    assert reader.sample_order(5, 1) != reader.sample_order(6, 1)
    assert reader.sample_order(5, 1, shuffle=False) == list(range(11))

    expected_ids = [reader.ids[i] for i in reader.sample_order(5, 3, rank=1, world_size=2)]
    threaded = [s["id"] for s in reader.iter_samples(5, 3, rank=1, world_size=2, num_threads=2, prefetch=2)]
    inline = [s["id"] for s in reader.iter_samples(5, 3, rank=1, world_size=2, num_threads=0)]
    assert threaded == inline == expected_ids
    assert [s["id"] for s in reader.iter_samples(5, 3, rank=1, world_size=2, start=2)] == expected_ids[2:]
    with pytest.raises(ValueError, match="need 0 <= rank < world_size, got rank=2, world_size=2"):
        reader.sample_order(0, 0, rank=2, world_size=2)


def test_bad_samples_and_settings_are_refused(tmp_path):
    writer = CacheWriter(tmp_path, make_identity())
    sample = make_sample(0)
    with pytest.raises(ValueError, match=r"features_TLH has shape \[3, 3, 16\], expected \[3, 2, 16\]"):
        writer.add({**sample, "features_TLH": torch.zeros(3, 3, H)})
    with pytest.raises(ValueError, match=r"missing \['final_TH'\]"):
        writer.add({k: v for k, v in sample.items() if k != "final_TH"})
    with pytest.raises(ValueError, match=r"input_ids must be integers in \[0, 1000\) \(the target's vocab size\)"):
        writer.add({**sample, "input_ids": sample["input_ids"] + 1000})
    writer.add(sample)
    with pytest.raises(ValueError, match="sample id 's000' was added twice"):
        writer.add(sample)
    writer.close()
    with pytest.raises(ValueError, match="unknown cache codec 'zip'"):
        CacheWriter(tmp_path, make_identity(), codec="zip")
    with pytest.raises(ValueError, match="samples_per_shard must be >= 1, got 0"):
        CacheWriter(tmp_path, make_identity(), samples_per_shard=0)
