"""Checkpoints, exact resume and the NaN stop of the trainer, on a tiny cache built once for the module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dspark.config import load_config
from dspark.train import checkpoint
from dspark.train.trainer import NonFiniteLossError, train

STEPS = 6  # of the 10 steps an epoch of the tiny cache has (20 conversations / micro batch 2)
pytestmark = pytest.mark.usefixtures("single_process_world")


def _cfg(run_dir: Path, tiny_llama_dir: Path, *extra: str):
    return load_config("tiny_llama_dspark", [f"run_dir={run_dir}", f"target.name_or_path={tiny_llama_dir}",
                                             f"train.max_steps={STEPS}", "train.num_threads=1", *extra])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    from dspark.stages import build_cache, prepare
    from dspark.targets import load_target

    run_dir = tmp_path_factory.mktemp("resume_cache")
    cfg = _cfg(run_dir, tiny_llama_dir)
    target = load_target(cfg.target)
    prepare(cfg, target=target, progress=False)
    return build_cache(cfg, target=target, progress=False)


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines()
    return {(r := json.loads(line))["step"]: r["loss/total"] for line in lines}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "drafter" / "model.safetensors")


def _tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_llama_dir, cache_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    result = train(_cfg(run_dir, tiny_llama_dir, "train.save_every=2", "train.keep_last=2"), cache_dir=cache_dir,
                   progress=False)
    assert result.steps == STEPS
    return run_dir


def test_periodic_checkpoints_keep_only_the_last(straight_run):
    assert _tags(straight_run) == ["step4", "step6"]
    for tag in ("step4", "step6"):
        record = json.loads((straight_run / "checkpoints" / tag / checkpoint.MARKER).read_text())
        assert record["step"] == int(tag[4:]) and record["world_size"] == 1
        assert record["epoch"] == 0 and record["micro_in_epoch"] == record["step"]  # no accumulation
    assert sorted(_losses(straight_run)) == list(range(1, STEPS + 1))


def test_interrupted_run_resumes_exactly(straight_run, tmp_path, tiny_llama_dir, cache_dir):
    cfg = _cfg(tmp_path, tiny_llama_dir, "train.save_every=2", "train.keep_last=2")
    paused = train(cfg, cache_dir=cache_dir, progress=False, stop_after_steps=3)
    assert paused.steps == 3 and not (tmp_path / "drafter").exists()
    assert _tags(tmp_path) == ["step2", "step3"]

    resumed = train(cfg, cache_dir=cache_dir, progress=False)
    assert resumed.steps == STEPS
    expected, got = _losses(straight_run), _losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))  # steps 1-3 from the first part, 4-6 after the resume
    assert [got[s] for s in range(4, STEPS + 1)] == [expected[s] for s in range(4, STEPS + 1)]
    ref, out = _weights(straight_run), _weights(tmp_path)
    assert ref.keys() == out.keys()
    assert all(torch.equal(ref[k], out[k]) for k in ref)
    assert _tags(tmp_path) == ["step4", "step6"]


# Run in a child process: train with a checkpoint every 2 steps, and when the step-4 save has written its first
# file from inside DeepSpeed's engine.save_checkpoint, say so and wait to be killed.
_KILLED_SAVE = """
import sys, time
import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from dspark.config import load_config
from dspark.train.trainer import train

run_dir, target_dir, cache_dir, signal_file = sys.argv[1:5]
engine_save = DeepSpeedEngine.save_checkpoint

def save_checkpoint(self, save_dir, tag=None, **kwargs):
    if tag == "step4":
        torch_save = torch.save

        def save_then_hang(obj, f, *args, **kw):
            torch_save(obj, f, *args, **kw)
            open(signal_file, "w").write(str(f))
            time.sleep(600)

        torch.save = save_then_hang
    return engine_save(self, save_dir, tag=tag, **kwargs)

DeepSpeedEngine.save_checkpoint = save_checkpoint
cfg = load_config("tiny_llama_dspark", [f"run_dir={run_dir}", f"target.name_or_path={target_dir}",
                                        "train.max_steps=%d", "train.num_threads=1", "train.save_every=2",
                                        "train.keep_last=2"])
train(cfg, cache_dir=cache_dir, progress=False)
""" % STEPS


def test_run_killed_inside_a_save_resumes_from_the_previous_checkpoint(straight_run, tmp_path, tiny_llama_dir,
                                                                        cache_dir):
    """A real kill (SIGKILL) while ``engine.save_checkpoint`` writes step 4: the step-2 checkpoint is the newest
    complete one, the resumed run retrains steps 3-6 exactly as an uninterrupted run did, and the torn step-4
    directory is replaced. A commit record written before the engine's files would make the torn save look
    complete, and its resume fail."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import DIST_ENV

    run_dir, signal_file, log = tmp_path / "run", tmp_path / "saving", tmp_path / "child.log"
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the child before the save
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(run_dir), str(tiny_llama_dir),
                                 str(cache_dir), str(signal_file)], env={**env, "OMP_NUM_THREADS": "1"},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not signal_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        reached = signal_file.exists()
        proc.send_signal(signal.SIGKILL)  # a no-op if the child already ended
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert reached, f"the child never reached the step-4 save (exit {proc.returncode}): {log.read_text()[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    torn = run_dir / "checkpoints" / "step4"
    assert torn.is_dir() and not (torn / checkpoint.MARKER).exists()  # killed half way through the step-4 save
    assert checkpoint.latest_complete(run_dir / "checkpoints")[0].name == "step2"

    cfg = _cfg(run_dir, tiny_llama_dir, "train.save_every=2", "train.keep_last=2")
    assert train(cfg, cache_dir=cache_dir, progress=False).steps == STEPS
    expected, got = _losses(straight_run), _losses(run_dir)  # the last record of each step: the resumed run's
    assert [got[s] for s in range(3, STEPS + 1)] == [expected[s] for s in range(3, STEPS + 1)]
    ref, out = _weights(straight_run), _weights(run_dir)
    assert ref.keys() == out.keys() and all(torch.equal(ref[k], out[k]) for k in ref)
    assert _tags(run_dir) == ["step4", "step6"]
    assert (torn / checkpoint.MARKER).is_file()


def test_checkpoint_from_another_world_size_is_refused(straight_run, tmp_path, tiny_llama_dir, cache_dir):
    shutil.copytree(straight_run / "checkpoints", tmp_path / "checkpoints")
    marker = tmp_path / "checkpoints" / "step6" / checkpoint.MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "world_size": 2}))
    with pytest.raises(ValueError, match=r"world size 2 but this run has world size 1"):
        train(_cfg(tmp_path, tiny_llama_dir), cache_dir=cache_dir, progress=False)


def test_checkpoint_from_an_older_dspark_resumes_when_new_fields_are_at_their_defaults(
        straight_run, tmp_path, tiny_llama_dir, cache_dir):
    # An older dspark wrote no drafter.dspark.bce_weight (as if added since): this run leaves it at its default.
    shutil.copytree(straight_run / "checkpoints", tmp_path / "checkpoints")
    marker = tmp_path / "checkpoints" / "step6" / checkpoint.MARKER
    record = json.loads(marker.read_text())
    del record["drafter"]["dspark"]["bce_weight"]
    marker.write_text(json.dumps(record))
    assert train(_cfg(tmp_path, tiny_llama_dir), cache_dir=cache_dir, progress=False).steps == STEPS
    # ... but not when this run sets the missing field to something else; the refused run's config is not
    # written over the run's own.
    with pytest.raises(ValueError, match=r"was saved with drafter=.* but this run has drafter="):
        train(_cfg(tmp_path, tiny_llama_dir, "drafter.dspark.bce_weight=0.5"), cache_dir=cache_dir, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["drafter"]["dspark"]["bce_weight"] == 1.0


def test_a_refused_run_leaves_the_run_config(tmp_path, tiny_llama_dir, tiny_qwen3_dir, cache_dir):
    """``<run>/config.json`` names the run's verifier (``dspark export`` reads it): a train refused because the
    cache was built for another target must not replace it."""
    cfg = _cfg(tmp_path, tiny_llama_dir)
    cfg.save(tmp_path / "config.json")  # as `dspark prepare` left it
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match=r"was built for a different target"):
        train(_cfg(tmp_path, tiny_qwen3_dir), cache_dir=cache_dir, progress=False)
    assert (tmp_path / "config.json").read_text() == before


def test_nan_loss_stops_without_saving(tmp_path, tiny_llama_dir, cache_dir, monkeypatch):
    from dspark.drafters.dspark.model import DSparkDrafter

    calls = {"n": 0}
    forward_loss = DSparkDrafter.forward_loss

    def poisoned(self, batch, generator=None):
        out = forward_loss(self, batch, generator)
        calls["n"] += 1
        if calls["n"] == 3:  # the third micro batch = optimizer step 3 (no accumulation)
            out = out._replace(numerator=out.numerator * float("nan"))
        return out

    monkeypatch.setattr(DSparkDrafter, "forward_loss", poisoned)
    cfg = _cfg(tmp_path, tiny_llama_dir, "train.save_every=1", "train.keep_last=5")
    with pytest.raises(ValueError, match=r"non-finite loss .* at step 3; stopping without saving") as err:
        train(cfg, cache_dir=cache_dir, progress=False)
    assert isinstance(err.value, NonFiniteLossError) and isinstance(err.value, FloatingPointError)
    assert _tags(tmp_path) == ["step1", "step2"]  # the periodic ones before the NaN, nothing after
    assert not (tmp_path / "drafter").exists()
    assert sorted(_losses(tmp_path)) == [1, 2]


def test_resume_across_an_epoch_with_accumulation(tmp_path, tiny_llama_dir, cache_dir):
    # 10 micro batches an epoch, accumulation 3: step 4 ends mid epoch 1, after an accumulation that straddled
    # the epoch boundary (micro batches 10, 11, 12).
    extra = ["train.max_steps=0", "train.num_epochs=2", "train.grad_accum_steps=3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_cfg(straight, tiny_llama_dir, *extra), cache_dir=cache_dir, progress=False)
    train(_cfg(split, tiny_llama_dir, *extra), cache_dir=cache_dir, progress=False, stop_after_steps=4)
    record = checkpoint.latest_complete(split / "checkpoints")[1]
    assert (record["step"], record["epoch"], record["micro_in_epoch"]) == (4, 1, 2)
    result = train(_cfg(split, tiny_llama_dir, *extra), cache_dir=cache_dir, progress=False)
    assert result.steps == 6
    expected, got = _losses(straight), _losses(split)
    assert [got[s] for s in (5, 6)] == [expected[s] for s in (5, 6)]
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight).values(), _weights(split).values()))
