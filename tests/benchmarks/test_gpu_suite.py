"""``benchmarks/gpu_suite.py --device cpu --small``: the items that can run on CPU pass, each in its own child
process, CUDA-only items are recorded as skipped with the reason, and a hung item is recorded as a failure
without stopping the suite.

To stay within ~60 s on a loaded 2-core machine (each child imports torch and builds its target) the test runs
one item of each kind; the siblings left out (``specdec_dflash``, ``specdec_eagle3``, ``step_dflash``,
``step_eagle3``) are the same functions with another recipe. ``--device cpu --small`` without ``--items`` runs
them all (~2 minutes here)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import DIST_ENV

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "gpu_suite.py"


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_small_run_passes_every_cpu_item_and_skips_the_cuda_ones(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "suite.json"
    chosen = ["specdec_dspark", "specdec_v4", "backends_features", "launcher_prepare", "zero3_offload_step",
              "launcher_eval", "nan_stop", "step_dspark", "step_v4", "eval_batch", "sps_table", "cache_reader"]
    proc = subprocess.run([sys.executable, str(SUITE), "--device", "cpu", "--small", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--items", ",".join(chosen)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    items = result["items"]
    failed = {name: r["error"] for name, r in items.items() if r["status"] == "fail"}
    assert not failed
    cuda_only = {"launcher_prepare", "zero3_offload_step", "launcher_eval", "nan_stop"}
    for name in cuda_only:
        assert items[name]["status"] == "skip" and "needs CUDA and NCCL" in items[name]["reason"]
    ran = {name for name, r in items.items() if r["status"] == "pass"}
    assert list(items) == chosen
    assert ran >= {"specdec_dspark", "backends_features", "step_dspark", "step_v4", "eval_batch", "sps_table",
                   "cache_reader"}
    assert items["step_dspark"]["speedup_vs_prefold_loss"] > 0 and items["step_dspark"]["tokens_per_s"] > 0
    assert items["eval_batch"]["batch16"]["target_tokens_per_s"] > 0
    assert set(items["sps_table"]["sps_by_rows"]) == {"1", "4", "16"}
    assert items["sps_table"]["rows16_full_block_vs_one_token_step_time"] > 0
    assert result["counts"]["fail"] == 0 and "specdec_dspark" in proc.stdout  # the table


def test_a_hung_item_is_a_failure_with_its_reason_and_the_rest_goes_on(tmp_path):
    suite = _load_suite()
    args = argparse.Namespace(device="cpu", small=True)
    record = suite.run_item("cache_reader", args, timeout_s=0.5, work=tmp_path)
    assert record["status"] == "fail" and record["error"].startswith("timed out after 0 s")
    args = argparse.Namespace(device="cpu", small=True, items="nan_stop,specdec_v4", budget_s=60, work=str(tmp_path))
    records = suite.run_suite(args)
    assert records["nan_stop"]["status"] == "skip" and "needs CUDA" in records["nan_stop"]["reason"]
    if importlib.util.find_spec("dspark.drafters.v4") is None:
        assert records["specdec_v4"] == {"status": "skip", "seconds": 0.0,
                                         "reason": "module dspark.drafters.v4 does not exist in this checkout"}
