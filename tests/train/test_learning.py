"""Training teaches the drafter its target. On the built-in SmolLM2-135M (a real model, not a random one), a short
run on the target's greedy answers to a few prompts must raise the T=0 tau on those prompts by at least
``MARGIN`` over the untrained drafter the run started from (same seed, same initialisation). It checks that the
loss, the optimizer and the decoding path fit together; it says nothing of generalisation (``benchmarks/``)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("single_process_world")

NUM_PROMPTS = 4
STEPS = 40
MARGIN = 0.5  # tau counts the bonus token: untrained ~1.0, a drafter that fits its answers well above


def test_short_training_raises_tau_on_the_builtin_target(tmp_path):
    from dspark import pipeline
    from dspark.config import load_config
    from dspark.targets import load_target

    cfg = load_config("smollm2_dspark", [
        f"run_dir={tmp_path}", f"data.max_prompts={NUM_PROMPTS + 1}", "data.num_eval_prompts=1",
        "data.max_new_tokens=48", "data.max_seq_len=256", "data.regen_batch_size=4",
        "drafter.block_size=4", "drafter.num_anchors=16", "drafter.markov_rank=32",
        f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.num_threads=2", "train.warmup_ratio=0.0",
        "eval.temperatures=[0.0]", f"eval.num_prompts={NUM_PROMPTS}", "eval.max_new_tokens=48",
        "eval.batch_size=4"])
    target = load_target(cfg.target)
    pipeline.prepare(cfg, target=target, progress=False)
    pipeline.build_cache(cfg, target=target, progress=False)
    assert pipeline.train(cfg, progress=False).steps == STEPS

    # The prompts it trained on, decoded greedily: the answers it was trained on.
    train_prompts = tmp_path / "trained_on.jsonl"
    rows = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == NUM_PROMPTS
    train_prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    report = pipeline.evaluate(cfg, target=target, progress=False, prompts_file=str(train_prompts))
    trained, untrained = (report["trained_on/T0"][name]["tau"] for name in ("trained", "untrained"))
    assert trained >= untrained + MARGIN, (trained, untrained)
