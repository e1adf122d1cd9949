"""`dspark calibrate` end to end on the tiny target: tools/profile_sps.py measures an SPS table, calibrate decodes,
fits STS on half of the prompts, writes calibration.json (which load_drafter then applies) and replays the held-out
rounds through the prefix scheduler; a drafter without a confidence head and a missing SPS table are one-line
errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import REPO, run_cli

BLOCK = 4


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, tiny_llama_dir):
    from dspark.config import DrafterConfig, DSparkConfig, TargetConfig
    from dspark.drafters import build_drafter
    from dspark.export import export_drafter
    from dspark.targets import load_target

    target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 1, 2]))
    root = tmp_path_factory.mktemp("calibrate")
    dirs = {}
    for algorithm in ("dspark", "dflash"):
        torch.manual_seed(0)
        heads = {"dspark": DSparkConfig(markov_rank=16)} if algorithm == "dspark" else {}
        cfg = DrafterConfig(algorithm=algorithm, block_size=BLOCK, **heads)
        drafter = build_drafter(cfg, target.config, target.layer_ids, target.embed_weight, target.lm_head_weight)
        export_drafter(drafter, root / algorithm / "drafter")
        dirs[algorithm] = root / algorithm
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["What is 2 + 2?", "Name a colour.", "Say hi.", "Count to five.", "Spell cat.",
                                "Name a fruit."]))
    return dirs, prompts


def _args(command, run_dir, tiny_llama_dir, *extra):
    return [command, "-c", "tiny_llama_dspark", "--set", f"run_dir={run_dir}",
            "--set", f"target.name_or_path={tiny_llama_dir}", *extra]


def test_profile_then_calibrate_with_scheduler_simulation(run_dirs, tiny_llama_dir, tmp_path):
    from dspark.eval.scheduler import SPSTable
    from dspark.export import load_drafter

    dirs, prompts = run_dirs
    sps_path = tmp_path / "sps.json"
    proc = run_cli([sys.executable, str(REPO / "tools" / "profile_sps.py"), "-c", "tiny_llama_dspark",
                    "--set", f"target.name_or_path={tiny_llama_dir}", "--batch-sizes", "1,2", "--context-len", "16",
                    "--warmup", "1", "--iters", "2", "--out", str(sps_path)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = json.loads(sps_path.read_text())
    # rows 1 and 2, each with 1 .. gamma + 1 = 5 tokens per row (the default for a block of 4).
    assert table["version"] == 2 and table["gamma"] == BLOCK == 4
    assert {rows: sorted(map(int, curve)) for rows, curve in table["sps_by_rows"].items()} == {
        "1": [1, 2, 3, 4, 5], "2": [1, 2, 3, 4, 5]}
    assert sorted(map(int, table["sps"])) == [1, 2, 3, 4, 5, 6, 8, 10]  # the batch-token view
    assert all(v > 0 for v in table["sps"].values()) and len(table["points"]) == 10

    run_dir = dirs["dspark"]
    proc = run_cli(_args("calibrate", run_dir, tiny_llama_dir, "--set", "eval.max_new_tokens=16",
                         "--set", "eval.batch_size=2", "--set", "eval.num_prompts=6", "--set", "eval.sts_step=0.25",
                         "--prompts", str(prompts), "--scheduler-sps", str(sps_path)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    calibration = json.loads((run_dir / "drafter" / "calibration.json").read_text())
    assert calibration["version"] == 1 and calibration["method"] == "sts"
    grid = [0.25 + 0.25 * i for i in range(16)]
    assert len(calibration["temperatures"]) == BLOCK and all(t in grid for t in calibration["temperatures"])
    assert calibration["num_fit_prompts"] == calibration["num_heldout_prompts"] == 3
    assert calibration["num_fit_rounds"] > 0 and calibration["num_heldout_rounds"] > 0
    assert 0 <= calibration["ece_before"] <= 1 and 0 <= calibration["ece_after"] <= 1
    assert "ece before" in proc.stdout and "algorithm1" in proc.stdout and "async" in proc.stdout
    # Batch 2 decodes through the batched session, so the replay plans one common prefix per step, as decoding does.
    assert "rows padded to the longest feed: one common prefix per step" in proc.stdout
    assert "calibration.json" in proc.stdout
    assert SPSTable.load(sps_path)(7, rows=2) > 0

    drafter = load_drafter(run_dir / "drafter")
    assert drafter.confidence_head.temperature_K.tolist() == calibration["temperatures"]

    # The deepspec export carries the calibration; its loader applies the same temperatures.
    proc = run_cli(["export", str(run_dir / "drafter"), str(tmp_path / "export"), "--format", "deepspec"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    exported = load_drafter(tmp_path / "export")
    assert exported.confidence_head.temperature_K.tolist() == calibration["temperatures"]


def test_calibrate_refuses_a_drafter_without_confidence_head_and_a_missing_table(run_dirs, tiny_llama_dir, tmp_path):
    dirs, prompts = run_dirs
    proc = run_cli(_args("calibrate", dirs["dflash"], tiny_llama_dir, "--prompts", str(prompts)))
    assert proc.returncode != 0 and "has no confidence head to calibrate" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli(_args("calibrate", dirs["dspark"], tiny_llama_dir, "--prompts", str(prompts),
                         "--scheduler-sps", str(tmp_path / "missing.json")))
    assert proc.returncode != 0 and "missing.json does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_training_again_removes_the_stale_calibration(tiny_demo_run, tiny_llama_dir, tmp_path):
    import shutil

    reference, _ = tiny_demo_run
    for part in ("data", "cache", "drafter"):
        shutil.copytree(reference / part, tmp_path / part)
    stale = tmp_path / "drafter" / "calibration.json"
    stale.write_text(json.dumps({"version": 1, "method": "sts", "temperatures": [2.0] * BLOCK}))
    proc = run_cli(_args("train", tmp_path, tiny_llama_dir, "--set", "train.max_steps=1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not stale.exists() and (tmp_path / "drafter" / "model.safetensors").is_file()
    assert "calibration.json: it calibrated the drafter this run replaces" in proc.stdout + proc.stderr
