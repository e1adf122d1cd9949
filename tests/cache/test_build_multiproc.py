"""Cache build across processes (`deepspeed launcher/build_cache.py`): the same cache as one process builds,
sample for sample and bit for bit, also after killed builds resumed on the same or another world size."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, run_cli

from dspark.cache import CacheReader
from dspark.config import load_config
from dspark.data.regenerate import write_jsonl
from dspark.stages import build_cache

NUM_CONVERSATIONS = 11  # capture batches of 4: rank 0 of 2 takes batches 0 and 2 (7 samples), rank 1 batch 1


def _conversations() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(NUM_CONVERSATIONS):
        T = int(torch.randint(5, 40, (1,), generator=g))
        rows.append({"id": f"conv-{i}", "input_ids": torch.randint(0, 49152, (T,), generator=g).tolist(),
                     "loss_mask": (torch.rand(T, generator=g) > 0.3).long().tolist()})
    return rows


def _overrides(run_dir: Path, target_dir: Path) -> list[str]:
    return ["--set", f"run_dir={run_dir}", "--set", f"target.name_or_path={target_dir}",
            "--set", "cache.samples_per_shard=2"]


def _build(run_dir: Path, target_dir: Path, num_procs: int) -> None:
    if num_procs == 1:  # the ordinary single-process command
        args = ["cache", "build", "-c", "tiny_llama_dspark", *_overrides(run_dir, target_dir)]
    else:
        launcher = str(Path(sys.executable).parent / "deepspeed")
        args = [launcher, "--num_gpus", str(num_procs), "--master_port", str(free_port()), "launcher/build_cache.py",
                "--config", "tiny_llama_dspark", *_overrides(run_dir, target_dir)]
    proc = run_cli(args, timeout=300)  # same thread count (run_cli's) in every process
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _assert_same_cache(ours: Path, reference: Path) -> None:
    a, b = CacheReader(ours), CacheReader(reference)
    assert sorted(a.ids) == sorted(b.ids) == sorted(f"conv-{i}" for i in range(NUM_CONVERSATIONS))
    for sample_id in b.ids:
        x, y = a.get(sample_id), b.get(sample_id)
        for key in ("input_ids", "loss_mask"):
            assert torch.equal(x[key], y[key]), (sample_id, key)
        for key in ("features_TLH", "final_TH"):  # bit patterns: NaN-safe and exact
            assert torch.equal(x[key].view(torch.int16), y[key].view(torch.int16)), (sample_id, key)
    assert a.manifest["num_tokens"] == b.manifest["num_tokens"]


def _shards(cache: Path) -> dict[str, str]:
    """Shard file -> checksum, from the manifest."""
    return {s["file"]: s["checksum"] for s in json.loads((cache / "manifest.json").read_text())["shards"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """A cache built by one process and one built by two, from the same conversations file."""
    out = {}
    for name, num_procs in (("one", 1), ("two", 2)):
        run_dir = tmp_path_factory.mktemp(name)
        write_jsonl(run_dir / "data" / "train.jsonl", _conversations())
        _build(run_dir, tiny_llama_dir, num_procs)
        out[name] = run_dir
    return out


def test_two_processes_build_the_cache_one_process_builds(runs):
    _assert_same_cache(runs["two"] / "cache", runs["one"] / "cache")
    shards = _shards(runs["two"] / "cache")
    # Each rank wrote its own shards: rank 0 seven samples (4 shards of 2), rank 1 four (2 shards).
    assert sorted(shards) == [f"shard-00000-0000{i}.bin" for i in range(4)] + [
        f"shard-00001-0000{i}.bin" for i in range(2)]
    assert not list((runs["two"] / "cache").glob(".*.tmp"))


def test_killed_build_resumes_per_rank_and_on_another_world_size(runs, tiny_llama_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(runs["two"] / "data", tmp_path / "data")
    shutil.copytree(runs["two"] / "cache", cache)
    before = _shards(cache)

    def kill(*shard_files: str) -> None:
        """What a kill leaves: no manifest, the named (last) shards unwritten, a half-written temp file."""
        (cache / "manifest.json").unlink()
        for name in shard_files:
            (cache / name).unlink()
            (cache / name.replace(".bin", ".idx.json")).unlink()
        (cache / f".{shard_files[-1]}.tmp").write_bytes(b"partial")

    # Both ranks killed mid-build, each half way through a capture batch. Resume on 2 ranks.
    kill("shard-00000-00003.bin", "shard-00001-00001.bin")
    _build(tmp_path, tiny_llama_dir, num_procs=2)
    _assert_same_cache(cache, runs["one"] / "cache")
    assert _shards(cache) == before  # finished shards are kept; the missing ones come back identical

    # Killed again, then resumed by a single process (in this one): it captures rank 1's remaining batch itself.
    kill("shard-00001-00001.bin")
    overrides = _overrides(tmp_path, tiny_llama_dir)[1::2]
    build_cache(load_config("tiny_llama_dspark", overrides), progress=False)
    _assert_same_cache(cache, runs["one"] / "cache")
    after = _shards(cache)
    assert {k: v for k, v in after.items() if k in before and k != "shard-00001-00001.bin"} == {
        k: v for k, v in before.items() if k != "shard-00001-00001.bin"}
    assert "shard-00000-00004.bin" in after and "shard-00001-00001.bin" not in after


def test_a_collective_backend_builds_the_same_cache_with_uneven_batches(runs, tmp_path, tiny_llama_dir):
    """zero3 features are collective: rank 1 has one capture batch to rank 0's two (11 conversations, batches of
    4), so it must join rank 0's last forward with a dummy batch or both hang. The features equal the hf build's
    up to bf16 rounding of values that differ by float noise."""
    run_dir = tmp_path / "zero3"
    write_jsonl(run_dir / "data" / "train.jsonl", _conversations())
    launcher = str(Path(sys.executable).parent / "deepspeed")
    proc = run_cli([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "launcher/build_cache.py",
                    "--config", "tiny_llama_dspark", *_overrides(run_dir, tiny_llama_dir),
                    "--set", "target.backend=zero3"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours, reference = CacheReader(run_dir / "cache"), CacheReader(runs["one"] / "cache")
    assert sorted(ours.ids) == sorted(reference.ids)
    for sample_id in reference.ids:
        x, y = ours.get(sample_id), reference.get(sample_id)
        assert torch.equal(x["input_ids"], y["input_ids"])
        for key in ("features_TLH", "final_TH"):
            torch.testing.assert_close(x[key].float(), y[key].float(), rtol=1e-2, atol=1e-3)
