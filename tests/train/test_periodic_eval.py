"""Periodic speculative-decoding eval during training (``train.eval_every``): logged at the right steps, and
training (losses, final weights) bit-identical to a run without it, across a resume too."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from dspark.config import ConfigError, load_config
from dspark.train.trainer import train

STEPS = 5  # evals at steps 2 and 4, each followed by a training step
pytestmark = pytest.mark.usefixtures("single_process_world")


def _cfg(run_dir: Path, tiny_llama_dir: Path, *extra: str):
    return load_config("tiny_llama_dspark", [f"run_dir={run_dir}", f"target.name_or_path={tiny_llama_dir}",
                                             f"train.max_steps={STEPS}", "train.num_threads=1",
                                             "eval.num_prompts=2", "eval.max_new_tokens=8",
                                             # 10 training conversations (5 steps of micro batch 2) + 4 held out
                                             "data.max_prompts=14", "data.max_new_tokens=16", *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama_dir) -> Path:
    """A run directory with prepared data (train + held-out prompts) and its cache."""
    from dspark.stages import build_cache, prepare
    from dspark.targets import load_target

    run_dir = tmp_path_factory.mktemp("eval_cache")
    cfg = _cfg(run_dir, tiny_llama_dir)
    target = load_target(cfg.target)
    prepare(cfg, target=target, progress=False)
    build_cache(cfg, target=target, progress=False)
    return run_dir


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss/total"] for r in _records(run_dir) if "loss/total" in r}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "drafter" / "model.safetensors")


def _checkpointed_drafter(run_dir: Path, tag: str, cfg, target):
    """The drafter as the checkpoint ``tag`` holds it (ZeRO-3: gathered from the partitions)."""
    from dspark.drafters import build_drafter

    drafter = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                            target.lm_head_weight)
    ckpt_dir = run_dir / "checkpoints"
    if cfg.train.zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    trainable = {name for name, p in drafter.named_parameters() if p.requires_grad}
    assert trainable <= set(state)
    drafter.load_state_dict({k: v for k, v in state.items() if k in trainable}, strict=False)
    return drafter.eval()


def _expected_eval(run_dir: Path, cfg, drafter, target) -> dict[str, float]:
    """``eval/tau_T<t>`` of ``drafter`` decoding the run's held-out prompts as ``PeriodicEval`` does."""
    from dspark.data.chat import prompt_ids
    from dspark.data.prompts import load_prompts
    from dspark.eval.specdec import evaluate

    prompts = [prompt_ids(target.tokenizer, p)
               for p in load_prompts(str(run_dir / "data" / "eval_prompts.jsonl"), cfg.eval.num_prompts)]
    return {f"eval/tau_T{t:g}": evaluate(target, drafter, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                                         temperature=t, seed=cfg.eval.seed, stop_ids=[target.tokenizer.eos_token_id],
                                         batch_size=cfg.eval.batch_size).tau
            for t in cfg.eval.temperatures}


@pytest.mark.parametrize("zero_stage", [0, 3])  # ZeRO-3: the drafter's partitions are gathered for decoding
def test_eval_is_logged_and_leaves_training_unchanged(tmp_path, tiny_llama_dir, prepared, capsys, zero_stage):
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    stage = f"train.zero_stage={zero_stage}"
    train(_cfg(plain, tiny_llama_dir, stage), cache_dir=prepared / "cache", progress=False)
    (evaluated / "data").mkdir(parents=True)
    shutil.copy(prepared / "data" / "eval_prompts.jsonl", evaluated / "data")
    # A checkpoint every 2 steps keeps the weights each eval saw (checkpoints change no training step).
    cfg = _cfg(evaluated, tiny_llama_dir, stage, "train.eval_every=2", "train.save_every=2", "train.keep_last=5")
    # Paused after step 3 and resumed: step 3 follows the eval at step 2 in the same process, step 5 follows
    # the eval at step 4 after a resume.
    assert train(cfg, cache_dir=prepared / "cache", progress=False, stop_after_steps=3).steps == 3
    assert train(cfg, cache_dir=prepared / "cache", progress=False).steps == STEPS

    evals = {r["step"]: r for r in _records(evaluated) if any(k.startswith("eval/") for k in r)}
    assert sorted(evals) == [2, 4]
    from dspark.targets import load_target

    target = load_target(cfg.target)
    for step, record in evals.items():
        # The tau logged at a step is what speculative decoding measures for the weights of that step.
        expected = _expected_eval(evaluated, cfg, _checkpointed_drafter(evaluated, f"step{step}", cfg, target), target)
        assert {k: record[k] for k in expected} == expected
        for tag in ("T1", "T0"):  # eval.temperatures defaults to [1.0, 0.0]
            assert 0.0 < record[f"eval/mean_proposal_len_{tag}"] <= cfg.drafter.block_size
            assert 0.0 <= record[f"eval/acceptance@1_{tag}"] <= 1.0
        assert not any(k.startswith("loss/") for k in record)  # its own record, at the training step
    assert evals[2] != evals[4]  # trained in between: other weights, other numbers
    # No eval at step 0 nor at the last step (5 is not a multiple of 2), and a console line per eval.
    out = capsys.readouterr().out
    assert out.count("eval @ step ") == 2 and "eval @ step 4: T1 tau " in out

    expected, got = _losses(plain), _losses(evaluated)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bit-identical: eval consumed no training randomness and changed no weights
    ref, out_w = _weights(plain), _weights(evaluated)
    assert ref.keys() == out_w.keys() and all(torch.equal(ref[k], out_w[k]) for k in ref)


def test_online_eval_reuses_the_hosted_target(tmp_path, tiny_llama_dir, prepared, monkeypatch):
    import dspark.targets

    shutil.copytree(prepared / "data", tmp_path / "data")
    loads = []
    load_target = dspark.targets.load_target
    monkeypatch.setattr(dspark.targets, "load_target", lambda *a, **k: loads.append(1) or load_target(*a, **k))
    cfg = _cfg(tmp_path, tiny_llama_dir, "train.online=true", "train.max_steps=2", "train.eval_every=2",
               "eval.temperatures=[1.0]")
    train(cfg, progress=False)
    assert len(loads) == 1  # the training source's target, decoded against too
    evals = [r for r in _records(tmp_path) if "eval/tau_T1" in r]
    assert [r["step"] for r in evals] == [2]
    # Step 2 is the last: the exported drafter holds the weights the eval decoded with.
    from dspark.export import load_drafter

    target = load_target(cfg.target)
    assert _expected_eval(tmp_path, cfg, load_drafter(tmp_path / "drafter").eval(), target) == \
        {"eval/tau_T1": evals[0]["eval/tau_T1"]}


def _two_rank_worker(rank: int, port: int, root: str, target_dir: str, cache_dir: str) -> None:
    """One of 2 ranks: ZeRO-3 runs without and with eval, one after the other in one process group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for name, extra in (("plain", []), ("evaluated", ["train.eval_every=2"])):
        # 10 conversations / (2 ranks x micro batch 2) = 2 steps an epoch: step 3 starts epoch 1 after an eval.
        cfg = _cfg(Path(root) / name, Path(target_dir), "train.zero_stage=3", "train.max_steps=0",
                   "train.num_epochs=2", *extra)
        train(cfg, cache_dir=Path(cache_dir), progress=False)


def test_two_rank_zero3_eval_decodes_on_rank_0_only(tmp_path, tiny_llama_dir, prepared):
    """Rank 0 decodes with the gathered drafter while rank 1 waits: a forward through ZeRO-3's hooks on one rank
    alone would hang in their all-gathers. Training stays identical."""
    from conftest import free_port, spawn_ranks

    (tmp_path / "evaluated" / "data").mkdir(parents=True)
    shutil.copy(prepared / "data" / "eval_prompts.jsonl", tmp_path / "evaluated" / "data")
    spawn_ranks(_two_rank_worker, (free_port(), str(tmp_path), str(tiny_llama_dir), str(prepared / "cache")), 2,
                timeout=240, what="2-rank ZeRO-3 runs with periodic eval")
    records = _records(tmp_path / "evaluated")
    assert [r["step"] for r in records if "eval/tau_T1" in r] == [2, 4]
    # Rank 0 decoded with the gathered weights: at the last step, those of the exported drafter.
    from dspark.export import load_drafter
    from dspark.targets import load_target

    cfg = _cfg(tmp_path / "evaluated", tiny_llama_dir)
    last = next(r for r in records if r["step"] == 4 and "eval/tau_T1" in r)
    target = load_target(cfg.target)
    expected = _expected_eval(tmp_path / "evaluated", cfg, load_drafter(tmp_path / "evaluated" / "drafter").eval(),
                              target)
    assert {k: last[k] for k in expected} == expected
    assert _losses(tmp_path / "evaluated") == _losses(tmp_path / "plain")
    assert sorted(_losses(tmp_path / "plain")) == [1, 2, 3, 4]


def test_missing_eval_prompts_are_refused_before_training(tmp_path, tiny_llama_dir, prepared):
    cfg = _cfg(tmp_path, tiny_llama_dir, "train.eval_every=2")
    with pytest.raises(FileNotFoundError, match=r"train.eval_every=2 needs the held-out prompts at .*"
                                                r"eval_prompts.jsonl, which is missing: run `dspark prepare`"):
        train(cfg, cache_dir=prepared / "cache", progress=False)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "tensorboard").exists()


def test_eval_needs_a_target_one_process_can_host(tmp_path, tiny_llama_dir, prepared):
    (tmp_path / "data").mkdir()
    shutil.copy(prepared / "data" / "eval_prompts.jsonl", tmp_path / "data")
    cfg = _cfg(tmp_path, tiny_llama_dir, "train.eval_every=2", "target.backend=zero3")
    with pytest.raises(ValueError, match=r"train.eval_every=2 decodes with the target, which "
                                         r"target.backend='zero3' cannot do here: it needs target.backend=hf"):
        train(cfg, cache_dir=prepared / "cache", progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_negative_eval_every_is_a_config_error(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"train.eval_every must be >= 0 \(0 = off\), got -1"):
        _cfg(tmp_path, tiny_llama_dir, "train.eval_every=-1")


def test_eval_reports_what_specdec_measures_and_restores_the_drafter(tmp_path, tiny_llama_dir, prepared,
                                                                    monkeypatch):
    """``PeriodicEval.run`` on a bare drafter: the scalars are specdec's report of the same weights, the drafter is
    back in train mode without its decoding cache, and the global RNG is as before even when decoding draws
    from it (as a drafter with dropout or an unseeded sampler would)."""
    from types import SimpleNamespace

    from dspark.data.chat import prompt_ids
    from dspark.data.prompts import load_prompts
    from dspark.drafters import build_drafter
    from dspark.eval import specdec
    from dspark.eval.periodic import PeriodicEval
    from dspark.targets import load_target

    (tmp_path / "data").mkdir()
    shutil.copy(prepared / "data" / "eval_prompts.jsonl", tmp_path / "data")
    cfg = _cfg(tmp_path, tiny_llama_dir, "train.eval_every=1", "eval.temperatures=[1.0]")
    target = load_target(cfg.target)
    torch.manual_seed(0)
    drafter = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                            target.lm_head_weight)
    engine = SimpleNamespace(module=drafter, device="cpu", zero_optimization_stage=lambda: 0)

    evaluate = specdec.evaluate

    def draws_global_rng(*args, **kwargs):
        torch.rand(8)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(specdec, "evaluate", draws_global_rng)
    periodic = PeriodicEval(cfg, rank=0)
    periodic.target = target
    rng_before = torch.get_rng_state()
    scalars = periodic.run(engine)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert drafter.training and not drafter._prefix_cache.rows

    prompts = [prompt_ids(target.tokenizer, p) for p in load_prompts(str(tmp_path / "data" / "eval_prompts.jsonl"),
                                                                       cfg.eval.num_prompts)]
    report = evaluate(target, drafter, prompts, max_new_tokens=cfg.eval.max_new_tokens, temperature=1.0,
                      seed=cfg.eval.seed, stop_ids=[target.tokenizer.eos_token_id], batch_size=cfg.eval.batch_size)
    expected = {"eval/tau_T1": report.tau, "eval/mean_proposal_len_T1": report.mean_proposal_len,
                **{f"eval/acceptance@{k}_T1": a for k, a in enumerate(report.acceptance_K, start=1)
                    if not math.isnan(a)}}
    assert scalars == expected
    assert len(periodic.prompt_ids) == cfg.eval.num_prompts == 2
