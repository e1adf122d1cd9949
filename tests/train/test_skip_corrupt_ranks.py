"""Corrupt cache samples on one rank of a 2-process run (gloo, DeepSpeed on CPU).

With ``cache.skip_corrupt`` the rank that hits them has fewer samples than the other; every optimizer step is
collective, so the ranks must still take the same steps (the epoch ends for all when one runs out), report the
skipped count of all ranks together, and resume exactly although their streams now stand at different places.
Without it, the rank that hits the corrupt sample raises naming it and the other stops too instead of hanging.

The cache is a real one (tiny llama target, 20 training conversations, 8 samples a shard); bytes inside three
samples of rank 1's epoch-0 slice are flipped in their shard files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

WORLD = 2
MICRO = 2  # micro batch; 20 samples -> 10 per rank -> 5 micro batches an epoch without corruption
EPOCHS = 2
CORRUPT_AT = (1, 2, 6)  # positions in rank 1's epoch-0 stream: at step 2 its stream is 2 samples ahead of rank 0's
PAUSE_AT = 2
TIMEOUT_S = 240  # a rank stuck in a collective would hang the test: never wait longer than this


def _overrides(run_dir: Path, target_dir: Path, skip: bool) -> list[str]:
    return [f"run_dir={run_dir}", f"target.name_or_path={target_dir}", f"cache.skip_corrupt={str(skip).lower()}",
            f"train.num_epochs={EPOCHS}", "train.max_steps=0", f"train.micro_batch_size={MICRO}",
            "train.num_threads=1", "train.lr=3e-3"]


def _worker(rank: int, port: int, cache_dir: str, root: str, target_dir: str) -> None:
    """One rank: a straight run, the same run paused and resumed, then a run without skip_corrupt."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    from dspark.config import load_config
    from dspark.distributed import barrier, shutdown
    from dspark.train.trainer import train

    root, out = Path(root), {}

    def run(name: str, skip: bool = True, **kwargs) -> None:
        cfg = load_config("tiny_llama_dspark", _overrides(root / name.split(":")[0], Path(target_dir), skip))
        result = train(cfg, cache_dir=Path(cache_dir), progress=False, **kwargs)
        out[name] = {"steps": result.steps, "num_skipped": result.num_skipped}

    run("straight")
    run("split:paused", stop_after_steps=PAUSE_AT)
    run("split:resumed")
    try:
        run("strict", skip=False)
    except Exception as exc:  # noqa: BLE001  (what each rank raised is the result)
        out["strict_error"] = {"type": type(exc).__name__, "message": str(exc)}
    (root / f"rank{rank}.json").write_text(json.dumps(out))
    # Leave together: a rank that exits while the other still tears down its gloo group can abort that one.
    barrier()
    shutdown()


def _corrupt_rank1_samples(cache_dir: Path, seed: int, shuffle_buffer: int, per_rank: int) -> tuple[list, dict]:
    """Flip a byte in the middle of the samples at ``CORRUPT_AT`` of rank 1's epoch-0 stream; returns their ids
    and, per epoch, every rank's stream (sample ids, first ``per_rank``)."""
    from dspark.cache import CacheReader
    from dspark.cache.format import read_shard_index

    reader = CacheReader(cache_dir, shuffle_buffer=shuffle_buffer)
    ids = reader.ids
    streams = {e: [[ids[p] for p in reader.sample_order(seed, e, r, WORLD)[:per_rank]] for r in range(WORLD)]
               for e in range(EPOCHS)}
    victims = [streams[0][1][i] for i in CORRUPT_AT]
    for shard in reader.manifest["shards"]:
        for entry in read_shard_index(cache_dir, shard["file"])["samples"]:
            if entry["id"] in victims:
                path = cache_dir / shard["file"]
                data = bytearray(path.read_bytes())
                data[entry["offset"] + entry["length"] // 2] ^= 0xFF
                path.write_bytes(bytes(data))
    reader.close()
    return victims, streams


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    from conftest import free_port, spawn_ranks
    from test_zero_parity import build_tiny_cache

    from dspark.config import load_config

    root = tmp_path_factory.mktemp("skip_corrupt")
    cache_dir = root / "cache"
    shutil.copytree(build_tiny_cache(root / "prep", tiny_llama_dir), cache_dir)
    cfg = load_config("tiny_llama_dspark", _overrides(root, tiny_llama_dir, True))
    num_samples = json.loads((cache_dir / "manifest.json").read_text())["num_samples"]
    per_rank = num_samples // WORLD
    victims, streams = _corrupt_rank1_samples(cache_dir, cfg.train.seed, cfg.cache.shuffle_buffer, per_rank)
    assert not set(victims) & set(streams[0][0])  # epoch 0: only rank 1 holds corrupt samples

    spawn_ranks(_worker, (free_port(), str(cache_dir), str(root), str(tiny_llama_dir)), WORLD, timeout=TIMEOUT_S,
                what="2-process runs with a corrupt cache")
    results = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return root, results, victims, streams, per_rank


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]


def test_ranks_take_the_same_steps_and_report_the_skipped_samples(runs):
    root, results, victims, streams, per_rank = runs
    # The epoch ends for every rank when the first runs out of good samples.
    good = {e: [sum(i not in victims for i in stream) for stream in streams[e]] for e in range(EPOCHS)}
    micro = {e: min(g // MICRO for g in good[e]) for e in range(EPOCHS)}
    assert micro[0] == (per_rank - len(CORRUPT_AT)) // MICRO < per_rank // MICRO  # rank 1 ran out first
    expected_steps = sum(micro.values())  # no accumulation: one step a micro batch
    for rank, result in enumerate(results):
        assert result["straight"]["steps"] == expected_steps, (rank, result)
    # Every rank returns the same all-rank count; epoch 0 alone skipped the three (rank 1 read its whole slice).
    assert results[0]["straight"]["num_skipped"] == results[1]["straight"]["num_skipped"] >= len(victims)

    rows = _rows(root / "straight")
    steps = [r["step"] for r in rows if "loss/total" in r]
    assert steps == list(range(1, expected_steps + 1))
    reports = [r for r in rows if "data/skipped_corrupt" in r]
    assert reports[0]["step"] == micro[0] and reports[0]["data/skipped_corrupt"] == len(victims)
    # Unused in epoch 0: what each rank had beyond the agreed micro batches, less what it skipped.
    assert reports[0]["data/unused_samples"] == WORLD * (per_rank - micro[0] * MICRO) - len(victims)
    assert sum(r["data/skipped_corrupt"] for r in reports) == results[0]["straight"]["num_skipped"]
    assert (root / "straight" / "drafter" / "model.safetensors").is_file()  # all epochs done: exported


def test_resume_after_skipped_samples_is_exact(runs):
    from safetensors.torch import load_file

    root, results, *_ = runs
    for result in results:
        assert result["split:paused"]["steps"] == PAUSE_AT
        assert result["split:resumed"]["steps"] == result["straight"]["steps"]
    record = json.loads(next((root / "split" / "checkpoints").glob(f"step{PAUSE_AT}/dspark_complete.json"))
                        .read_text())
    # Rank 1 passed over two corrupt samples in its first two micro batches.
    assert record["stream_positions"] == [PAUSE_AT * MICRO, PAUSE_AT * MICRO + 2]
    straight = {r["step"]: r["loss/total"] for r in _rows(root / "straight") if "loss/total" in r}
    split = {r["step"]: r["loss/total"] for r in _rows(root / "split") if "loss/total" in r}
    assert split == straight  # bit-identical, steps 1-2 before the pause and the rest after the resume
    ref, out = load_file(root / "straight" / "drafter" / "model.safetensors"), load_file(
        root / "split" / "drafter" / "model.safetensors")
    assert ref.keys() == out.keys() and all(torch.equal(ref[k], out[k]) for k in ref)


def test_without_skip_corrupt_the_rank_that_hits_it_names_it_and_the_other_stops(runs):
    root, results, victims, *_ = runs
    errors = [result["strict_error"] for result in results]
    shard_and_sample = r"shard-\d+-\d+\.bin: sample '([^']+)' at offset \d+: checksum mismatch"
    assert errors[1]["type"] == "CacheCorruptError", errors
    found = re.search(shard_and_sample, errors[1]["message"])
    assert found and found.group(1) == victims[0], errors[1]
    assert errors[0]["type"] == "DataFailedError", errors
    assert errors[0]["message"].startswith("rank 1 could not read its training data in epoch 0 (CacheCorruptError: ")
    assert re.search(shard_and_sample, errors[0]["message"]) and errors[0]["message"].endswith("rank 0 stops too")
    assert not (root / "strict" / "drafter").exists()


class _Source:
    """A sample source of ``n`` samples (position p has input ids ``[p, p, p]``) that skips ``corrupt`` ones like the
    cache reader does with skip_corrupt, and raises at ``fail_at``."""

    def __init__(self, n: int, corrupt=(), fail_at: int | None = None, never_read: int | None = None):
        self.n, self.corrupt, self.fail_at, self.never_read, self.num_skipped = n, set(corrupt), fail_at, never_read, 0

    def __len__(self) -> int:
        return self.n

    def iter_samples(self, seed, epoch, rank=0, world_size=1, *, start=0):
        from dspark.cache.format import CacheCorruptError

        for p in range(start, self.n):
            assert p != self.never_read, f"position {p} is past per_rank and must not be read"
            if p == self.fail_at:
                raise CacheCorruptError(f"shard-x.bin: sample 's{p}' at offset 0: checksum mismatch",
                                        shard="shard-x.bin", sample_id=f"s{p}", offset=0)
            if p in self.corrupt:
                self.num_skipped += 1
                continue
            yield {"id": f"s{p}", "input_ids": torch.full((3,), p), "loss_mask": torch.ones(3, dtype=torch.bool),
                   "features_TLH": torch.zeros(3, 1, 2), "final_TH": torch.zeros(3, 2)}


def _drain(feed) -> list[tuple[list[int], int]]:
    out = []
    while (batch := feed.next_batch()) is not None:
        out.append((batch["input_ids_BT"][:, 0].tolist(), feed.position))
    return out


def test_epoch_batches_track_the_stream_past_skipped_samples_in_one_process():
    from dspark.cache.format import CacheCorruptError
    from dspark.train.sources import EpochBatches

    def feed(source, start=0):
        return EpochBatches(source, seed=0, epoch=0, rank=0, world_size=1, per_rank=10, micro_batch_size=2,
                            max_seq_len=8, start=start)

    # Positions 2 and 5 are corrupt; position 10 (the extra sample of a longer rank) is never asked for.
    whole = feed(_Source(11, corrupt=(2, 5), never_read=10))
    assert _drain(whole) == [([0, 1], 2), ([3, 4], 5), ([6, 7], 8), ([8, 9], 10)]
    assert whole.ended and whole.num_batches == 4 and whole.totals() == (2, 0)
    # Resuming from a saved stream position continues with exactly the batches that were still to come.
    assert _drain(feed(_Source(11, corrupt=(2, 5), never_read=10), start=5)) == [([6, 7], 8), ([8, 9], 10)]
    # An odd good count leaves a sample that fills no batch: unused, not skipped.
    odd = feed(_Source(10, corrupt=(2,)))
    assert [ids for ids, _ in _drain(odd)] == [[0, 1], [3, 4], [5, 6], [7, 8]] and odd.totals() == (1, 1)
    with pytest.raises(CacheCorruptError, match=r"shard-x.bin: sample 's3'"):
        _drain(feed(_Source(10, fail_at=3)))
    with pytest.raises(ValueError, match=r"start 11 is outside this rank's 0..10 samples"):
        feed(_Source(10), start=11)
