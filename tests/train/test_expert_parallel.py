"""Expert parallelism for the V4 drafter (dspark.train.expert_parallel): 2 gloo processes with EP=2 inside a real
DeepSpeed engine give the losses and gradients of one process on the same data (fp32, 1e-5), each rank holds half
of the routed-expert parameters, a checkpoint saved with EP=2 resumes exactly, and gathering the experts for export
gives the single-device drafter back. Through the launcher's entry the tiny V4 recipe trains with EP=2 as with
EP=1 (losses, checkpoint, the drafter it writes). Bad EP sizes are refused."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "drafters"))  # tiny_v4 lives with the drafter tests

WORLD = 2
TIMEOUT_S = 180
STAGES = (0, 2)


def _ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}


def _batch(r: int):
    from tiny_v4 import features

    return features(2, 24, seed=1 + r), torch.Generator().manual_seed(10 + r)


def _reference() -> tuple[float, dict[str, torch.Tensor]]:
    """One process, no process group: the loss over both ranks' data (summed numerators over summed weights)."""
    from tiny_v4 import make_drafter

    drafter = make_drafter(v4={"moe_bias_update_rate": 0.0}).train()
    outs = [drafter(*_batch(r)) for r in range(WORLD)]
    loss = sum(o.numerator for o in outs) / sum(o.weight_sum for o in outs)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in drafter.named_parameters() if p.requires_grad}


def _engine(stage: int, scramble: bool = False):
    import deepspeed
    from tiny_v4 import make_drafter

    from dspark.train.expert_parallel import apply_expert_parallel

    drafter = make_drafter(v4={"moe_bias_update_rate": 0.0}).train()
    if scramble:  # other trained weights and selection biases (the frozen embedding and head stay the target's)
        with torch.no_grad():
            for p in [*drafter.trainable_parameters(), *(s.mlp.gate.e_score_correction_bias for s in drafter.stages)]:
                p.add_(torch.randn_like(p) * 0.1)
    apply_expert_parallel(drafter, WORLD, WORLD)
    engine, *_ = deepspeed.initialize(model=drafter, model_parameters=drafter.trainable_parameters(),
                                      config=_ds_config(stage))
    return engine


def _step(engine, rank: int, grads: bool = False):
    """The trainer's normalisation: numerator * world / all-rank weight sum (DeepSpeed averages over ranks)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    out = engine(*_batch(rank))
    weight_sum = out.weight_sum.detach().float().clone()
    dist.all_reduce(weight_sum)
    loss = out.numerator * WORLD / weight_sum
    engine.backward(loss)
    got = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()} if grads else None
    engine.step()
    total = loss.detach().clone() / WORLD
    dist.all_reduce(total)
    return float(total), got


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    ref_loss, ref_grads = _reference()
    result = {"ref_loss": ref_loss, "stages": {}}
    for stage in STAGES:
        engine = _engine(stage)
        names = dict(engine.module.named_parameters())
        expert = {n: p for n, p in names.items() if "deepspeed_experts" in n}
        loss, grads = _step(engine, rank, grads=True)
        # The expert slice of the one-process gradient: stages.S.mlp.experts.gate_up_proj[first + local id].
        diffs = {}  # name -> (max |EP - one process|, max |one process|)
        for n, g in grads.items():
            if n in expert:
                stage_moe, local = n.split(".deepspeed_moe.experts.deepspeed_experts.")
                e, kind = local.split(".")
                first = engine.module.get_submodule(stage_moe).first
                want = ref_grads[f"{stage_moe}.{kind}"][first + int(e)]
            else:
                want = ref_grads[n]
            diffs[n] = (float((g - want).abs().max()), float(want.abs().max()))
        saved = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        engine.save_checkpoint(f"{root}/ckpt{stage}", tag="t")
        next_loss, _ = _step(engine, rank)
        after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        resumed = _engine(stage, scramble=True)  # the load must replace every trained weight
        resumed.load_checkpoint(f"{root}/ckpt{stage}", tag="t")
        load_mismatch = [n for n, p in resumed.module.named_parameters() if not torch.equal(p, saved[n])]
        resumed_loss, _ = _step(resumed, rank)
        resumed_after = dict(resumed.module.named_parameters())
        result["stages"][stage] = {
            "load_mismatch": load_mismatch, "loss": loss, "grad_diffs": diffs, "next_loss": next_loss,
            "resumed_loss": resumed_loss,
            "resume_max_diff": max(float((after[n] - resumed_after[n]).abs().max()) for n in after),
            "expert_numel": sum(p.numel() for p in expert.values()),
            "expert_numel_full": sum(ref_grads[n].numel() for n in ref_grads if n.endswith(("gate_up_proj",
                                                                                          "down_proj"))
                                     and ".experts." in n),
            "n_params": len(names),
            "expert_ids": sorted({m.first + e for m in engine.module.modules() if hasattr(m, "first")
                                  for e in range(m.num_local_experts)})}
    # Export path: gathering the experts back gives the single-device drafter's state dict (names and values).
    from tiny_v4 import make_drafter

    from dspark.train.expert_parallel import gather_experts

    gathered = _engine(0).module
    result["gathered"] = gather_experts(gathered)
    want = make_drafter(v4={"moe_bias_update_rate": 0.0}).state_dict()
    got = gathered.state_dict()
    result["gather_mismatch"] = sorted(set(want) ^ set(got)) + [n for n in want if n in got
                                                                  and not torch.equal(want[n], got[n])]
    torch.save(result, f"{root}/rank{rank}.pt")


def test_expert_parallel_equals_one_process_and_resumes(tmp_path):
    from conftest import free_port, spawn_ranks

    results = spawn_ranks(_worker, (free_port(), str(tmp_path)), WORLD, timeout=TIMEOUT_S,
                          what="EP=2 drafter training", results=tmp_path)
    for rank, res in enumerate(results):
        for stage, got in res["stages"].items():
            assert got["loss"] == pytest.approx(res["ref_loss"], rel=1e-5, abs=1e-6), (rank, stage)
            # fp32, 1e-5: only the summation order of the expert terms and of the all-reduces differs.
            bad = {n: d for n, d in got["grad_diffs"].items() if d[0] > 1e-5 * max(1.0, d[1])}
            assert not bad, (rank, stage, bad)
            assert got["expert_numel"] * WORLD == got["expert_numel_full"] > 0
            assert got["load_mismatch"] == [], (rank, stage)
            assert got["resumed_loss"] == got["next_loss"] and got["resume_max_diff"] == 0.0, (rank, stage)
    assert [(res["gathered"], res["gather_mismatch"]) for res in results] == [(3, [])] * WORLD
    # The two ranks hold disjoint halves of the 4 experts, and the same number of tensors.
    assert [res["stages"][0]["expert_ids"] for res in results] == [[0, 1], [2, 3]]
    assert results[0]["stages"][0]["n_params"] == results[1]["stages"][0]["n_params"]


def test_bad_expert_parallel_size_is_refused():
    """Through the trainer's hook and the recipe field: 3 divides neither the 4 experts nor the world of 2."""
    from tiny_v4 import make_drafter

    from dspark.config import ConfigError, load_config
    from dspark.train.drafter_hooks import prepare_drafter

    cfg = load_config("tiny_deepseek_v4_dspark", ["train.expert_parallel=3"])
    with pytest.raises(ValueError, match=r"^train.expert_parallel=3 must divide the routed experts \(4\) and the "
                                         r"world size \(2\)$"):
        prepare_drafter(make_drafter(), cfg, world=2)
    import tiny_drafters  # a DSpark drafter: no routed experts

    with pytest.raises(ValueError, match=r"^train.expert_parallel=3, but drafter 'dspark' has no routed experts; "
                                         r"expected algorithm dspark_v4 or train.expert_parallel=1$"):
        prepare_drafter(tiny_drafters.make_drafter(), cfg, world=3)
    with pytest.raises(ConfigError, match=r"^train.expert_parallel=2 needs train.eval_every=0 and train.zero_stage 0, 1"
                                          r" or 2 \(got 5 and 0\)"):
        load_config("tiny_deepseek_v4_dspark", ["train.expert_parallel=2", "train.eval_every=5"])



STEPS = 3


def _conversations(n: int = 12, vocab: int = 49152) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        T = int(torch.randint(16, 40, (1,), generator=g))
        rows.append({"id": f"conv-{i}", "input_ids": torch.randint(3, vocab, (T,), generator=g).tolist(),
                     "loss_mask": [0] * (T // 4) + [1] * (T - T // 4)})
    return rows


def _launcher_worker(rank: int, port: int, root: str, target_dir: str) -> None:
    """`deepspeed launcher/train.py --config tiny_deepseek_v4_dspark --set ...` as the launcher sets up a rank
    (environment, then the script's own ``launcher_main``), run twice in these 2 processes, EP=1 then EP=2: one
    process start-up instead of two (importing transformers' V4 alone takes seconds)."""
    import runpy

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    from dspark.distributed import launcher_main

    script = Path(__file__).resolve().parents[2] / "launcher" / "train.py"
    entry = runpy.run_path(str(script), run_name="launcher_train")  # its functions, not its __main__ block
    for ep in (1, 2):
        sets = [f"run_dir={root}/ep{ep}", f"target.name_or_path={target_dir}", f"train.max_steps={STEPS}",
                "train.online=true", "train.num_threads=1", f"train.expert_parallel={ep}",
                # No warmup and a large lr: every step moves the weights enough for the next loss to show a wrong
                # gradient (at the recipe's lr a missing expert-gradient reduction moves the losses < 1e-6).
                "train.lr=0.01", "train.warmup_ratio=0"]
        sys.argv = [str(script), f"--local_rank={rank}", "--config", "tiny_deepseek_v4_dspark",
                    *[a for s in sets for a in ("--set", s)]]
        assert launcher_main(entry["__doc__"], entry["_train"]) == 0


def _expert_state_numel(optim_file: Path) -> tuple[int, int]:
    """(expert, other) parameter elements whose Adam state a rank's optimizer file holds."""
    groups_ = torch.load(optim_file, weights_only=False)["optimizer"]
    state, counts = groups_["state"], [0, 0]
    for group in groups_["param_groups"]:
        for i in group["params"]:
            counts[0 if group.get("moe") else 1] += state[i]["exp_avg"].numel()
    return counts[0], counts[1]


def test_launcher_trains_the_tiny_v4_recipe_with_expert_parallelism(tmp_path, tokenizer_dir):
    """The launcher's entry on 2 gloo processes, the tiny V4 recipe trained online: EP=2 gives EP=1's losses step
    by step (fp32), its checkpoint holds each rank's half of the routed experts, and the drafter it writes at the
    end (experts gathered back) loads as EP=1's."""
    import json

    from conftest import free_port, spawn_ranks

    from dspark.data.regenerate import write_jsonl
    from dspark.export import load_drafter
    from dspark.targets.tiny import make_tiny_target

    target_dir = make_tiny_target(tmp_path / "v4", "deepseek_v4", tokenizer_dir)
    for ep in (1, 2):
        write_jsonl(tmp_path / f"ep{ep}" / "data" / "train.jsonl", _conversations())
    spawn_ranks(_launcher_worker, (free_port(), str(tmp_path), str(target_dir)), WORLD, timeout=TIMEOUT_S,
                what="launcher EP=1 and EP=2 training")
    losses = {}
    for ep in (1, 2):
        records = [json.loads(line) for line in (tmp_path / f"ep{ep}" / "tensorboard" / "metrics.jsonl")
                   .read_text().splitlines()]
        losses[ep] = {r["step"]: r["loss/total"] for r in records}
    assert sorted(losses[2]) == sorted(losses[1]) == list(range(1, STEPS + 1))
    for step, loss in losses[1].items():
        assert losses[2][step] == pytest.approx(loss, rel=1e-6), step
    # The drafter written at the end (the experts gathered back in order) loads, and holds EP=1's weights. To 1e-3:
    # Adam moves a weight whose gradient is rounding noise by up to lr (1e-2) whatever that noise is, so summation
    # order alone moves a few such weights by ~6e-4 (the Markov head's near-zero rows); experts gathered out of
    # order or left untrained would be ~1e-2 off.
    drafters = {ep: load_drafter(tmp_path / f"ep{ep}" / "drafter") for ep in (1, 2)}
    assert drafters[2].algorithm == "dspark_v4"
    want, got = drafters[1].state_dict(), drafters[2].state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-3, rtol=0, msg=name)
    # The EP=2 checkpoint: DeepSpeed-MoE's file per (stage, expert), and one optimizer file per rank holding the
    # Adam state of that rank's half of the routed experts next to the whole dense part.
    ckpt = tmp_path / "ep2" / "checkpoints" / f"step{STEPS}"
    experts = {p.name for p in ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt")}
    assert experts == {f"layer_{s}_expert_{e}_mp_rank_00_model_states.pt" for s in range(3) for e in range(4)}
    expert_numel = sum(t.numel() for n, t in got.items() if ".experts." in n)
    per_rank = [_expert_state_numel(ckpt / f"expp_rank_{r}_mp_rank_00_optim_states.pt") for r in range(WORLD)]
    dense_numel = sum(t.numel() for n, t in got.items() if ".experts." not in n and "e_score_correction" not in n
                      and not n.startswith(("embed_tokens", "lm_head")))
    assert per_rank == [(expert_numel // WORLD, dense_numel)] * WORLD, (per_rank, expert_numel, dense_numel)
