"""Training teaches the drafter its target. On the built-in SmolLM2-135M (a real model, not a random one), a short
run on the target's greedy answer to one prompt must raise the T=0 tau on that prompt by at least ``MARGIN`` over
the untrained drafter the run started from (same seed, same initialisation). It checks that the loss, the optimizer
and the decoding path fit together on real features; it says nothing of generalisation (``benchmarks/``).

Sized for a loaded 2-core machine: one 24-token answer, 40 steps on it at a constant lr of 1e-2 (measured: the
untrained drafter's tau is 1.00; 60 such steps reach 3.43)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_process_world")

STEPS = 40
MARGIN = 0.5  # tau counts the bonus token: 1.0 = no draft ever accepted


def test_short_training_raises_tau_on_the_builtin_target(tmp_path):
    from dspark import stages
    from dspark.config import load_config
    from dspark.data.chat import prompt_ids
    from dspark.drafters import build_drafter
    from dspark.eval.specdec import evaluate
    from dspark.export import load_drafter
    from dspark.targets import load_target

    # 2 prompts: one held out by prepare, one trained on (micro batch 1: one step an epoch).
    cfg = load_config("smollm2_dspark", [
        f"run_dir={tmp_path}", "data.max_prompts=2", "data.num_eval_prompts=1", "data.max_new_tokens=24",
        "data.max_seq_len=256", "drafter.block_size=4", "drafter.num_anchors=32", "drafter.dspark.markov_rank=32",
        f"train.num_epochs={STEPS}", "train.micro_batch_size=1", "train.lr=1e-2", "train.min_lr_ratio=1.0",
        "train.warmup_ratio=0.0", "train.num_threads=2"])
    target = load_target(cfg.target)
    stages.prepare(cfg, target=target, progress=False)
    stages.build_cache(cfg, target=target, progress=False)
    assert stages.train(cfg, progress=False).steps == STEPS

    (row,) = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    trained = load_drafter(tmp_path / "drafter").eval()
    torch.manual_seed(cfg.train.seed)  # the initialisation the run started from
    untrained = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                              target.lm_head_weight).eval()
    # The prompt it trained on, decoded greedily: the answer it was trained on.
    ids = [prompt_ids(target.tokenizer, row["prompt"])]
    tau = {name: evaluate(target, drafter, ids, max_new_tokens=24, temperature=0.0, seed=0,
                          stop_ids=[target.tokenizer.eos_token_id]).tau
           for name, drafter in (("trained", trained), ("untrained", untrained))}
    assert tau["trained"] >= tau["untrained"] + MARGIN, tau
