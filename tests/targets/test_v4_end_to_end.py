"""The whole pipeline on a tiny DeepSeek-V4 target (mHC residual streams, sliding-window and compressed attention,
hash-routed MoE): `dspark demo` regenerates answers, captures features with every stream into the cache, trains a
DSpark drafter on their mean over the streams, evaluates it with speculative decoding (rolling V4's cache back by
snapshot and replay; batched decoding falls back to one session per prompt) and exports it."""

from __future__ import annotations

import json

from conftest import expected_demo_eval, run_cli, timeless
from tiny_families import save_tiny


def test_demo_runs_end_to_end_on_deepseek_v4(tmp_path, tokenizer_dir):
    target_dir = save_tiny("deepseek_v4", tmp_path / "v4", 1 << 20, tokenizer_dir=tokenizer_dir)
    run_dir = tmp_path / "run"
    proc = run_cli(["demo", "-c", "tiny_llama_dspark", "--set", f"run_dir={run_dir}",
                    "--set", f"target.name_or_path={target_dir}", "--set", "target.layer_ids=[0,1,2]",
                    "--set", "data.max_prompts=10", "--set", "data.max_new_tokens=16", "--set", "eval.batch_size=2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((run_dir / "cache" / "manifest.json").read_text())
    assert manifest["num_samples"] > 0
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    for tag in ("T1", "T0"):
        for name in ("trained", "untrained"):
            assert report[tag][name]["num_rounds"] > 0
    # What the demo measured is the decoding of its drafters here, through V4's rollback (one session a prompt).
    expected = expected_demo_eval(run_dir, target_dir, "target.layer_ids=[0,1,2]", "data.max_prompts=10",
                              "eval.batch_size=2")
    assert {tag: {name: timeless(r) for name, r in rows.items()} for tag, rows in report.items()} == expected
    assert "one session per prompt instead" in proc.stdout + proc.stderr
    assert (run_dir / "export" / "deepspec" / "model.safetensors").is_file()
