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
    from dspark.pipeline import build_cache, prepare
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
    # A save killed half way: DeepSpeed's files (and its `latest`) but no commit record. Resume must skip it.
    shutil.copytree(tmp_path / "checkpoints" / "step3", tmp_path / "checkpoints" / "step5")
    (tmp_path / "checkpoints" / "step5" / checkpoint.MARKER).unlink()
    (tmp_path / "checkpoints" / "latest").write_text("step5")
    assert checkpoint.latest_complete(tmp_path / "checkpoints")[0].name == "step3"

    resumed = train(cfg, cache_dir=cache_dir, progress=False)
    assert resumed.steps == STEPS
    expected, got = _losses(straight_run), _losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))  # steps 1-3 from the first part, 4-6 after the resume
    assert [got[s] for s in range(4, STEPS + 1)] == [expected[s] for s in range(4, STEPS + 1)]
    ref, out = _weights(straight_run), _weights(tmp_path)
    assert ref.keys() == out.keys()
    assert all(torch.equal(ref[k], out[k]) for k in ref)
    # The interrupted step5 save is older than the newest complete checkpoint: pruned with the rest.
    assert _tags(tmp_path) == ["step4", "step6"]


def test_checkpoint_from_another_world_size_is_refused(straight_run, tmp_path, tiny_llama_dir, cache_dir):
    shutil.copytree(straight_run / "checkpoints", tmp_path / "checkpoints")
    marker = tmp_path / "checkpoints" / "step6" / checkpoint.MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "world_size": 2}))
    with pytest.raises(ValueError, match=r"world size 2 but this run has world size 1"):
        train(_cfg(tmp_path, tiny_llama_dir), cache_dir=cache_dir, progress=False)


def test_checkpoint_from_an_older_dspark_resumes_when_new_fields_are_at_their_defaults(
        straight_run, tmp_path, tiny_llama_dir, cache_dir):
    # An older dspark wrote no ttt_length (an Eagle3 field added since): this run leaves it at its default.
    shutil.copytree(straight_run / "checkpoints", tmp_path / "checkpoints")
    marker = tmp_path / "checkpoints" / "step6" / checkpoint.MARKER
    record = json.loads(marker.read_text())
    del record["drafter"]["ttt_length"]
    marker.write_text(json.dumps(record))
    assert train(_cfg(tmp_path, tiny_llama_dir), cache_dir=cache_dir, progress=False).steps == STEPS
    # ... but not when this run sets the missing field to something else.
    with pytest.raises(ValueError, match=r"was saved with drafter=.* but this run has drafter="):
        train(_cfg(tmp_path, tiny_llama_dir, "drafter.ttt_length=3"), cache_dir=cache_dir, progress=False)


def test_nan_loss_stops_without_saving(tmp_path, tiny_llama_dir, cache_dir, monkeypatch):
    from dspark.drafters.dspark.model import DSparkDrafter

    calls = {"n": 0}
    forward_loss = DSparkDrafter.forward_loss

    def poisoned(self, batch, generator=None):
        out = forward_loss(self, batch, generator)
        calls["n"] += 1
        if calls["n"] == 3:  # the third micro batch = optimizer step 3 (no accumulation)
            out.numerator = out.numerator * float("nan")
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
