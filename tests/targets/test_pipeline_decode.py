"""Decoding on the pipeline backend (2 gloo processes, 2 stages) equals the single-process hf backend.

One spawn covers every family: the workers write their results to disk, the parent runs the same calls on the hf
backend and compares. Every spawn has a deadline: a failure on one rank would otherwise hang the other.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_families import save_tiny

from dspark.config import TargetConfig
from dspark.targets import load_target
from tests.conftest import free_port, spawn_ranks

FAMILIES = ("llama", "qwen3", "deepseek_v3")
LAYER_IDS = [-1, 0, 2]  # 4 layers over 2 stages: -1 and 0 on stage 0, 2 on stage 1
SHARD_BYTES = 120_000  # several shards per tiny model
VOCAB = 1024  # SmolLM2's tokenizer, the model's vocab cut to its first 1024 ids (keeps each model small)
SEQ = torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(0))
# Unequal lengths: batches of 2, 2 and 1 after sorting by length, left-padded; with 2 stages two batches are in
# flight and the third takes the slot of the first to finish.
PROMPTS = [[5, 17, 301, 9, 44], [12, 7, 7, 1002, 3, 88, 45, 6, 230], [40, 41], [900, 3, 77, 15], [8, 600, 31]]


def run_calls(target) -> dict:
    """The calls compared between backends, in the same order on every rank of a replica and on hf."""
    session = target.decode_session()
    steps = [session.extend(SEQ[:5]), session.extend(SEQ[5:6]), session.extend(SEQ[6:7])]  # prefill, then singles
    session.extend(SEQ[7:10] + 1)  # rejected drafts, rolled back
    session.truncate(7)
    steps.append(session.extend(SEQ[7:12]))
    out = {"logits": torch.cat([s[0] for s in steps]), "feats": torch.cat([s[1] for s in steps]),
           "length": session.length}
    out["greedy"] = target.generate(PROMPTS, max_new_tokens=6, temperature=0.0, batch_size=2, seed=0)
    # A stop token taken from the greedy output (its latest first occurrence before the end in some row): rows
    # that reach it stop there and pad while the others go on.
    tokenizer = target.tokenizer
    target.tokenizer = SimpleNamespace(eos_token_id=_stop_token(out["greedy"]), pad_token_id=tokenizer.pad_token_id)
    out["stopped"] = target.generate(PROMPTS, max_new_tokens=6, temperature=0.0, batch_size=2, seed=0)
    target.tokenizer = tokenizer
    return out


def eval_report(target) -> dict:
    """``dspark eval``'s speculative-decoding loop (untrained DSpark drafter, sampling): every rank of a replica
    runs it on the same logits and features, so every rank must produce the same report as hf."""
    from dspark.config import DrafterConfig, DSparkConfig
    from dspark.drafters import build_drafter
    from dspark.eval.specdec import evaluate

    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfig(block_size=4, dspark=DSparkConfig(markov_rank=16)),
                            target.config, target.layer_ids, target.embed_weight, target.lm_head_weight)
    report = evaluate(target, drafter, PROMPTS[:3], max_new_tokens=10, temperature=1.0, seed=3).to_dict()
    for key in ("wall_s", "tokens_per_s", "calibration"):  # timings; confidences are floats of the features
        report.pop(key)
    return report


def _stop_token(greedy: list[list[int]]) -> int:
    return max(((row.index(t), t) for row in greedy for t in row[:-1]), default=(0, greedy[0][0]))[1]


def _errors(target) -> list[str]:
    """Bad input fails on every rank before any collective, so no rank is left waiting."""
    messages = []
    for call in (lambda: target.decode_session().extend(torch.tensor([], dtype=torch.long)),
                 lambda: target.decode_session().truncate(-1),
                 lambda: target.generate(PROMPTS, max_new_tokens=4, temperature=0.0, batch_size=0, seed=0),
                 lambda: target.generate([[1, 2], []], max_new_tokens=4, temperature=0.0, batch_size=2, seed=0)):
        with pytest.raises(ValueError) as info:
            call()
        messages.append(str(info.value))
    return messages


def _worker(rank: int, world: int, port: int, jobs: dict[str, dict], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for key, job in jobs.items():
        target = load_target(TargetConfig(backend="pipeline", **job))
        results[key] = run_calls(target)
        results[key]["sampled"] = target.generate(PROMPTS, max_new_tokens=6, temperature=1.0, batch_size=2, seed=3)
        results[key]["decode_group"] = target.decode_group()
        results[key]["stage"] = target.stage
        if key == "llama" and world == 2:
            results[key]["errors"] = _errors(target)
        if key == "qwen3" and world == 2:
            results[key]["eval"] = eval_report(target)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _spawn(jobs: dict, out_dir: Path, world: int = 2, timeout: float = 240) -> list[dict]:
    """Run ``_worker`` on ``world`` processes and load what each rank saved."""
    return spawn_ranks(_worker, (world, free_port(), jobs, str(out_dir)), world, timeout=timeout,
                       what="pipeline workers", results=out_dir)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline-decode")
    return {f: save_tiny(f, root / f, SHARD_BYTES, tokenizer_dir=tokenizer_dir, vocab_size=VOCAB, num_layers=4)
            for f in FAMILIES}


def _hf_reference(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark.targets.hf import HFTarget

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return HFTarget(model, AutoTokenizer.from_pretrained(model_dir), LAYER_IDS, "reference")


def test_decoding_matches_hf_backend_on_two_stages(tiny_dirs, tmp_path, one_thread):
    jobs = {f: {"name_or_path": str(d), "pipeline_stages": 2, "dtype": "float32", "layer_ids": LAYER_IDS}
            for f, d in tiny_dirs.items()}
    # Two replicas of a 1-stage pipeline: each rank decodes on its own (no broadcasts).
    jobs["llama-1stage"] = {**jobs["llama"], "pipeline_stages": 1}
    results = _spawn(jobs, tmp_path)

    for key, job in jobs.items():
        ref = _hf_reference(Path(job["name_or_path"]))
        want = run_calls(ref)
        assert want["logits"].shape == (12, VOCAB) and want["feats"].shape == (12, len(LAYER_IDS), 64)
        for rank, res in enumerate(results):
            got = res[key]
            # Every member of the replica gets the full logits and all feature layers, whichever stage it is.
            torch.testing.assert_close(got["logits"], want["logits"], atol=1e-5, rtol=1e-5, msg=key)
            assert got["logits"].dtype == torch.float32
            torch.testing.assert_close(got["feats"], want["feats"], atol=1e-5, rtol=1e-5, msg=key)
            assert got["length"] == want["length"] == 12
            assert got["greedy"] == want["greedy"], key
            assert got["stopped"] == want["stopped"], key
            if job["pipeline_stages"] == 2:
                assert got["stage"] == rank and got["decode_group"] == (0, 1)
            else:
                assert got["stage"] == 0 and got["decode_group"] == (rank, 2)
        stop = _stop_token(want["greedy"])
        for stopped, greedy in zip(want["stopped"], want["greedy"]):
            assert stopped == (greedy[: greedy.index(stop) + 1] if stop in greedy else greedy)
        assert min(len(s) for s in want["stopped"]) < 6  # the stop is exercised
        if job["pipeline_stages"] == 2:  # sampling: the ranks of one replica agree, and it is not greedy
            assert results[0][key]["sampled"] == results[1][key]["sampled"] != results[0][key]["greedy"]
            assert all(len(s) == 6 or s[-1] == ref.tokenizer.eos_token_id for s in results[0][key]["sampled"])

        if key == "qwen3":
            want_eval = eval_report(ref)
            assert want_eval["num_rounds"] > 0
            assert results[0][key]["eval"] == results[1][key]["eval"] == want_eval

    for res in results:
        errors = res["llama"]["errors"]
        assert "non-empty 1-D tensor" in errors[0] and "shape (0,)" in errors[0]
        assert "length >= 0, got -1" in errors[1]
        assert "batch_size >= 1" in errors[2] and "got 0" in errors[2]
        assert "empty prompts at indices [1]" in errors[3]


def test_three_stages(tiny_dirs, tmp_path, one_thread):
    """A middle stage passes hidden states and generate's work items on (4 layers: [emb, 0, 1] [2] [3, norm])."""
    job = {"name_or_path": str(tiny_dirs["qwen3"]), "pipeline_stages": 3, "dtype": "float32", "layer_ids": LAYER_IDS}
    results = _spawn({"qwen3": job}, tmp_path, world=3)
    want = run_calls(_hf_reference(tiny_dirs["qwen3"]))
    for rank, res in enumerate(results):
        got = res["qwen3"]
        assert got["stage"] == rank
        torch.testing.assert_close(got["logits"], want["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["feats"], want["feats"], atol=1e-5, rtol=1e-5)
        assert (got["greedy"], got["stopped"]) == (want["greedy"], want["stopped"])
        assert got["sampled"] == results[0]["qwen3"]["sampled"]
