"""`dspark eval --prompts FILE` with several drafters: one report row, plot line and TensorBoard series per
drafter, with and without the static confidence cut; a malformed prompt file or two drafters of one name give a
one-line error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import decoded_report, run_cli, timeless


@pytest.fixture(scope="module")
def drafter_dirs(tmp_path_factory, tiny_llama_dir):
    from dspark.config import DrafterConfig, DSparkConfig, TargetConfig
    from dspark.drafters import build_drafter
    from dspark.export import export_drafter
    from dspark.targets import load_target

    target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 1, 2]))
    root = tmp_path_factory.mktemp("drafters")
    dirs = []
    for seed, name in enumerate(["a", "b"]):
        torch.manual_seed(seed)
        drafter = build_drafter(DrafterConfig(block_size=4, dspark=DSparkConfig(markov_rank=16)),
                                target.config, target.layer_ids, target.embed_weight, target.lm_head_weight)
        dirs.append(export_drafter(drafter, root / name / "drafter"))
    return dirs


def _eval_args(run_dir, tiny_llama_dir, *extra: str) -> list[str]:
    return ["eval", "-c", "tiny_llama_dspark", "--set", f"run_dir={run_dir}",
            "--set", f"target.name_or_path={tiny_llama_dir}", "--set", "eval.temperatures=[0.0]",
            "--set", "eval.max_new_tokens=8", "--set", "eval.batch_size=2", *extra]


def test_eval_prompt_file_with_two_drafters(tmp_path, tiny_llama_dir, drafter_dirs):
    prompts = tmp_path / "my_prompts.jsonl"
    prompts.write_text(json.dumps({"turns": ["What is 2 + 2?", "And 3 + 3?"]}) + "\n\n"
                       + json.dumps({"prompt": "Name a colour."}) + "\n" + json.dumps({"prompt": "Say hi."}) + "\n")
    run_dir = tmp_path / "run"
    proc = run_cli(_eval_args(run_dir, tiny_llama_dir, "--set", "eval.confidence_threshold=0.3",
                              "--prompts", str(prompts), "--drafter", f"first={drafter_dirs[0]}",
                              "--drafter", str(drafter_dirs[1])), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert list(report) == ["my_prompts/T0"]
    rows = report["my_prompts/T0"]
    # "drafter" is the second directory's name; each confident drafter also ran with the cut.
    assert list(rows) == ["first", "first@c0.3", "drafter", "drafter@c0.3"]
    # Each row is its own drafter's decoding of the file's first eval.num_prompts prompts, with or without the cut.
    from dspark.config import TargetConfig
    from dspark.data.prompts import load_prompts
    from dspark.export import load_drafter
    from dspark.targets import load_target

    target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 1, 2]))
    texts = load_prompts(str(prompts), 2)
    for name, directory in (("first", drafter_dirs[0]), ("drafter", drafter_dirs[1])):
        drafter = load_drafter(directory).eval()
        for threshold, row in ((0.0, name), (0.3, f"{name}@c0.3")):
            assert timeless(rows[row]) == decoded_report(target, drafter, texts, temperature=0.0, max_new_tokens=8,
                                                         batch_size=2, confidence_threshold=threshold), row
    for name, r in rows.items():
        assert r["num_prompts"] == 2 and r["tokens_per_s"] > 0
        # plain target decoding of the same prompts, measured in the same run, and the drafter's ratio to it
        assert r["target_tokens_per_s"] > 0
        assert r["speedup_vs_target"] == pytest.approx(r["tokens_per_s"] / r["target_tokens_per_s"])
        assert len(r["acceptance_K"]) == len(r["survival_K"]) and r["calibration"]["num_pairs"] > 0
        assert r["confidence_threshold"] == (0.3 if name.endswith("@c0.3") else 0.0)
    assert rows["first@c0.3"]["mean_proposal_len"] <= rows["first"]["mean_proposal_len"]
    assert "drafter" in proc.stdout and "tau" in proc.stdout and "auroc" in proc.stdout

    for png in ("acceptance_my_prompts_T0.png", "reliability_my_prompts_T0.png"):
        assert (run_dir / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = [json.loads(line) for line in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    step0 = {k for row in logged if row["step"] == 0 for k in row}
    assert {"eval_my_prompts_T0/first/tau", "eval_my_prompts_T0/drafter/mean_proposal_len",
            "eval_my_prompts_T0/first@c0.3/tokens_per_s", "eval_my_prompts_T0/first/conf_ece"} <= step0
    assert any(row["step"] == 1 and "eval_my_prompts_T0/first/acceptance" in row for row in logged)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_eval_refuses_a_malformed_prompt_file_and_duplicate_names(tmp_path, tiny_llama_dir, drafter_dirs):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n{not json\n")
    proc = run_cli(_eval_args(tmp_path / "run", tiny_llama_dir, "--prompts", str(bad),
                              "--drafter", str(drafter_dirs[0])))
    assert proc.returncode != 0
    assert f"{bad}:2: malformed JSON" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_cli(_eval_args(tmp_path / "run", tiny_llama_dir, "--prompts", str(bad),
                              "--drafter", str(drafter_dirs[0]), "--drafter", str(drafter_dirs[1])))
    assert proc.returncode != 0 and "two drafters named 'drafter'" in proc.stderr


def test_eval_verify_policies_sweep_and_missing_sps_table(tmp_path, tiny_llama_dir, drafter_dirs):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Count to five.", "Say hi.", "Why?"]))
    run_dir = tmp_path / "run"
    proc = run_cli(_eval_args(run_dir, tiny_llama_dir, "--prompts", str(prompts), "--drafter", str(drafter_dirs[0]),
                              "--set", "eval.verify_policy=scheduler", "--set", "eval.confidence_threshold=0.3",
                              "--set", "eval.policy_sweep=[full,threshold,scheduler,scheduler_async]",
                              "--set", "eval.sweep_batch_sizes=[1,2]"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # No table for this device: one warning naming the command that measures one, then a flat stand-in.
    assert proc.stderr.count("no SPS table for device cpu") == 1
    assert f"tools/profile_sps.py -c RECIPE --set run_dir={run_dir} --batch-sizes 1,4,16 --out " \
           f"{run_dir}/sps/cpu.json" in proc.stderr
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["p/T0"]["drafter"]["verify_policy"] == "scheduler"
    sweep = json.loads((run_dir / "eval" / "policies.json").read_text())["p/T0"]
    assert sweep["drafter"] == "drafter" and sweep["sps"].startswith("flat SPS")
    rows = {(r["batch_size"], r["policy"]): r for r in sweep["rows"]}
    assert set(rows) == {(b, p) for b in (1, 2) for p in ("full", "threshold", "scheduler", "scheduler_async")}
    for (batch, policy), r in rows.items():
        assert r["generated_tokens"] == rows[(batch, "full")]["generated_tokens"]  # greedy: the same tokens
        assert r["target_calls"] > 0 and r["target_step_s"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens_per_target_call"] == pytest.approx(r["generated_tokens"] / r["target_calls"])
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / rows[(batch, "full")]["tokens_per_s"])
        assert (r["simulated_speedup"] is None) == (policy == "threshold")
    assert rows[(1, "full")]["simulated_speedup"] == 1.0
    assert rows[(2, "threshold")]["mean_proposal_len"] < rows[(2, "full")]["mean_proposal_len"]
    assert (run_dir / "eval" / "throughput_p_T0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "scheduler_async" in proc.stdout and "tok/call" in proc.stdout

    proc = run_cli(_eval_args(run_dir, tiny_llama_dir, "--set", "eval.policy_sweep=[full,greedy]"))
    assert proc.returncode != 0
    assert "eval.policy_sweep[1]: 'greedy' is not one of full, threshold, scheduler, scheduler_async" in proc.stderr
