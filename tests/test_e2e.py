"""End to end: `dspark demo` on a tiny random llama target, the artifacts it leaves, and CLI errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import expected_demo_eval, free_port, run_cli, timeless


def assert_one_line_error(proc, pattern: str):
    import re

    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert re.search(pattern, errors[0]), errors[0]


def test_demo_leaves_every_artifact(tiny_demo_run, tiny_llama_dir):
    run_dir, stdout = tiny_demo_run
    for rel in ["config.json", "data/train.jsonl", "data/eval_prompts.jsonl", "cache/manifest.json",
                "drafter/config.json", "eval/report.json", "eval/acceptance_T1.png", "eval/acceptance_T0.png",
                "export/deepspec/config.json", "export/deepspec/model.safetensors", "demo_summary.json"]:
        assert (run_dir / rel).is_file(), rel
    assert "artifacts:" in stdout and str(run_dir / "drafter") in stdout
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    # The report is the decoding of the exported drafter and of the untrained one on the held-out prompts.
    expected = expected_demo_eval(run_dir, tiny_llama_dir)
    assert {tag: {name: timeless(r) for name, r in rows.items()} for tag, rows in report.items()} == expected
    for tag in ("T1", "T0"):
        for name in ("trained", "untrained"):
            assert len(report[tag][name]["acceptance_K"]) == 4  # block size of the tiny recipe
    assert json.loads((run_dir / "config.json").read_text())["target"]["name_or_path"].endswith("llama")


def test_export_matches_deepspec_layout(tiny_demo_run):
    from safetensors import safe_open

    run_dir, _ = tiny_demo_run
    out = run_dir / "export" / "deepspec"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"]
    assert config["model_type"] == "qwen3"
    assert config["num_hidden_layers"] == 1 and config["block_size"] == 4
    assert config["target_layer_ids"] == [0, 1, 2] and config["markov_rank"] == 16
    assert config["markov_head_type"] == "vanilla" and config["enable_confidence_head"] is True
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("fc.weight").shape == (64, 3 * 64)
        assert f.get_tensor("markov_head.markov_w1.weight").shape == (config["vocab_size"], 16)
        assert f.get_tensor("confidence_head.proj.weight").shape == (1, 64 + 16)
    expected = {"embed_tokens.weight", "lm_head.weight", "fc.weight", "hidden_norm.weight", "norm.weight",
                "markov_head.markov_w1.weight", "markov_head.markov_w2.weight", "confidence_head.proj.weight",
                "confidence_head.proj.bias"}
    expected |= {f"layers.0.{n}.weight" for n in [
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"]}
    assert names == expected
    assert not any(n.startswith("model.") for n in names)


def test_tensorboard_scalars_read_back(tiny_demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tiny_demo_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["loss/total", "loss/ce", "loss/l1", "loss/bce", "accept_rate@1", "accept_rate@4",
                "tau_estimate", "lr", "grad_norm", "tokens_per_s", "data_wait_fraction", "memory/peak_rss_gb",
                "eval_T1/trained/tau", "eval_T0/untrained/tau"]:
        assert tag in tags, (tag, sorted(tags))
    losses = [e.value for e in acc.Scalars("loss/total")]
    assert len(losses) >= 5 and all(v == v for v in losses)  # one per step, finite
    lrs = [e.value for e in acc.Scalars("lr")]
    assert max(lrs) > 0
    assert all(e.value > 0 for e in acc.Scalars("grad_norm"))


def test_cache_for_other_layer_ids_is_refused(tiny_demo_run, tiny_llama_dir):
    run_dir, _ = tiny_demo_run
    proc = run_cli(["train", "-c", "tiny_llama_dspark", "--set", f"run_dir={run_dir}",
                    "--set", f"target.name_or_path={tiny_llama_dir}", "--set", "target.layer_ids=[0, 2]"])
    assert_one_line_error(proc, r"layer_ids.*\[0, 1, 2\].*\[0, 2\]")


def test_cache_for_other_target_is_refused(tiny_demo_run, tiny_qwen3_dir):
    run_dir, _ = tiny_demo_run
    proc = run_cli(["train", "-c", "tiny_llama_dspark", "--set", f"run_dir={run_dir}",
                    "--set", f"target.name_or_path={tiny_qwen3_dir}"])
    assert_one_line_error(proc, r"config_hash")


def test_two_process_deepspeed_launcher(tiny_demo_run, tiny_llama_dir, tmp_path):
    run_dir, _ = tiny_demo_run
    shutil.copytree(run_dir / "cache", tmp_path / "cache")
    # The venv's launcher, whether or not the venv is on PATH (CI calls .venv/bin/python directly).
    launcher = str(Path(sys.executable).parent / "deepspeed")
    proc = run_cli([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "launcher/train.py",
                    "--config", "tiny_llama_dspark", "--set", f"run_dir={tmp_path}",
                    "--set", f"target.name_or_path={tiny_llama_dir}", "--set", "train.micro_batch_size=1"],
                   timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "drafter" / "model.safetensors").is_file()
    lines = (tmp_path / "tensorboard" / "metrics.jsonl").read_text().splitlines()
    # 20 training conversations / (2 ranks x micro batch 1) = 10 steps.
    assert json.loads(lines[-1])["step"] == 10


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["prepare", "--set", "drafter.num_layer=2"], r"unknown config key 'drafter.num_layer'; valid keys"),
        (["prepare", "--set", "target.name_or_path=/no/such/model.gguf"], r"target path .* does not exist"),
        (["train", "--set", "run_dir=/no/such/run"], r"cache|manifest"),
    ],
)
def test_cli_errors_are_one_line(args, pattern):
    assert_one_line_error(run_cli(args, timeout=300), pattern)


def test_empty_prompt_file_is_refused(tmp_path, tiny_llama_dir):
    (tmp_path / "empty.jsonl").write_text("")
    proc = run_cli(["prepare", "-c", "tiny_llama_dspark", "--set", f"data.prompts={tmp_path}/empty.jsonl",
                    "--set", f"run_dir={tmp_path}/run", "--set", f"target.name_or_path={tiny_llama_dir}"])
    assert_one_line_error(proc, r"empty|no prompts")


def test_cache_verify_names_a_flipped_byte(tiny_demo_run, tmp_path):
    run_dir, _ = tiny_demo_run
    cache = tmp_path / "cache"
    shutil.copytree(run_dir / "cache", cache)
    ok = run_cli(["cache", "verify", str(cache)])
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 20 samples"), ok.stdout + ok.stderr
    shard = sorted(cache.glob("shard-*.bin"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert_one_line_error(run_cli(["cache", "verify", str(cache)]), shard.name)


def test_dflash_trains_and_evaluates_through_the_same_loop(tiny_demo_run, tiny_llama_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tiny_demo_run
    shutil.copytree(run_dir / "cache", tmp_path / "cache")
    shutil.copytree(run_dir / "data", tmp_path / "data")
    common = ["-c", "tiny_llama_dflash", "--set", f"run_dir={tmp_path}",
              "--set", f"target.name_or_path={tiny_llama_dir}"]
    for command in (["train"], ["eval"]):
        proc = run_cli([*command, *common])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    config = json.loads((tmp_path / "drafter" / "config.json").read_text())
    assert config["markov_rank"] == 0 and config["enable_confidence_head"] is False
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "loss/ce" in tags and "loss/l1" not in tags and "eval_T0/trained/tau" in tags
