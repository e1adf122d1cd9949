"""Gemma4 end to end: `dspark demo -c tiny_gemma4_dspark` and `-c tiny_gemma4_eagle3` on the built-in tiny Gemma4
(train, eval, deepspec export as Gemma4DSparkModel / Gemma4Eagle3Model), speculative decoding equal to target
decoding at T = 0 with the trained DSpark and Eagle3 drafters and a DFlash one, and one-line refusals: a Gemma4
recipe on a Qwen3 target and the reverse."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from test_e2e import assert_one_line_error


@pytest.fixture(scope="module")
def gemma4_demo(tmp_path_factory, tiny_gemma4_dir):
    run_dir = tmp_path_factory.mktemp("gemma4_demo") / "run"
    proc = run_cli(["demo", "-c", "tiny_gemma4_dspark", "--set", f"run_dir={run_dir}",
                    "--set", f"target.name_or_path={tiny_gemma4_dir}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def gemma4_eagle3_demo(tmp_path_factory, tiny_gemma4_dir):
    run_dir = tmp_path_factory.mktemp("gemma4_eagle3_demo") / "run"
    # Fewer prompts and tokens than the recipe: the stages are what is checked here.
    proc = run_cli(["demo", "-c", "tiny_gemma4_eagle3", "--set", f"run_dir={run_dir}",
                    "--set", f"target.name_or_path={tiny_gemma4_dir}", "--set", "data.max_prompts=12",
                    "--set", "eval.num_prompts=1", "--set", "eval.max_new_tokens=12"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_tiny_gemma4_eagle3_demo_trains_evaluates_and_exports(gemma4_eagle3_demo):
    report = json.loads((gemma4_eagle3_demo / "eval" / "report.json").read_text())
    assert set(report) >= {"T1", "T0"} and len(report["T0"]["trained"]["acceptance_K"]) == 4
    summary = json.loads((gemma4_eagle3_demo / "demo_summary.json").read_text())
    assert summary["train_steps"] > 0 and summary["final_loss"] > 0
    exported = json.loads((gemma4_eagle3_demo / "export" / "deepspec" / "config.json").read_text())
    assert exported["architectures"] == ["Gemma4Eagle3Model"] and exported["target_layer_ids"] == [0, 1, 2]
    assert (exported["ttt_length"], exported["step_loss_decay"], exported["final_logit_softcapping"]) == (4, 0.8, 30.0)


def test_tiny_gemma4_demo_trains_evaluates_and_exports(gemma4_demo):
    report = json.loads((gemma4_demo / "eval" / "report.json").read_text())
    assert set(report) >= {"T1", "T0"} and len(report["T0"]["trained"]["acceptance_K"]) == 4
    exported = json.loads((gemma4_demo / "export" / "deepspec" / "config.json").read_text())
    assert exported["architectures"] == ["Gemma4DSparkModel"] and exported["mask_token_id"] == 4
    assert exported["final_logit_softcapping"] == 30.0 and exported["target_layer_ids"] == [0, 1, 2]


def test_speculative_decoding_equals_target_decoding_at_t0(gemma4_demo, gemma4_eagle3_demo, tiny_gemma4_dir,
                                                           one_thread):
    from dspark.config import DrafterConfig, TargetConfig
    from dspark.data.chat import prompt_ids
    from dspark.drafters import build_drafter
    from dspark.eval.specdec import speculative_generate, target_generate
    from dspark.export import load_drafter
    from dspark.targets import load_target

    target = load_target(TargetConfig(name_or_path=str(tiny_gemma4_dir), layer_ids=[0, 1, 2], family="gemma4"))
    torch.manual_seed(0)
    dflash = build_drafter(DrafterConfig(algorithm="dflash", block_size=4, mask_token_id=4), target.config,
                           target.layer_ids,
                           target.embed_weight, target.lm_head_weight).eval()
    trained = load_drafter(gemma4_demo / "export" / "deepspec").eval()
    eagle3 = load_drafter(gemma4_eagle3_demo / "export" / "deepspec").eval()
    assert eagle3.algorithm == "eagle3" and eagle3.variant.gemma4
    stop = [target.tokenizer.eos_token_id]
    for prompt in ("Name three colors of the rainbow.", "How do I boil an egg?"):
        ids = prompt_ids(target.tokenizer, prompt)
        plain = target_generate(target, ids, max_new_tokens=24, temperature=0.0, stop_ids=stop)
        for drafter in (trained, eagle3, dflash):
            spec = speculative_generate(target, drafter, ids, max_new_tokens=24, temperature=0.0, stop_ids=stop)
            assert spec.tokens == plain and sum(spec.proposed) > 0


def test_recipe_family_refusals(tiny_gemma4_dir, tiny_qwen3_dir, tmp_path):
    proc = run_cli(["prepare", "-c", "tiny_gemma4_eagle3", "--set", f"run_dir={tmp_path / 'a'}",
                    "--set", f"target.name_or_path={tiny_qwen3_dir}"])
    assert_one_line_error(proc, r"model_type 'qwen3' but the recipe is for gemma4 targets \(target.family=gemma4")
    proc = run_cli(["prepare", "-c", "qwen3_4b_eagle3", "--set", f"run_dir={tmp_path / 'b'}",
                    "--set", f"target.name_or_path={tiny_gemma4_dir}", "--set", "target.layer_ids=[0,1,2]"])
    assert_one_line_error(proc, r"model_type 'gemma4_text' but the recipe is for qwen3 targets")
