"""Benchmark: DeepSeek-V4's mtp.* DSpark draft (``dspark_v4``) on CPU: expert parallelism and acceptance.

1. Training step time of a scaled-down V4 draft (3 stages, hidden 256, 16 routed experts top-4 of width 256, 4 mHC
   streams, vocab 4096, batch 2 x 256 tokens of random features, 32 anchors) on 2 gloo processes, inside DeepSpeed
   (ZeRO 0, AdamW), with ``train.expert_parallel`` 1 and 2. Both engines live in the same two processes and their
   steps alternate, so the EP 2 / EP 1 ratio is measured in one run under the same load. Also the routed-expert
   parameters each rank holds (what EP divides).
2. Acceptance of a tiny V4 draft trained vs untrained on the tiny V4 target (``tiny_deepseek_v4_dspark``: the target
   regenerates its answers, the cache keeps every mHC stream, the trainer trains the draft), measured by real
   speculative decoding at T=0 on the recipe's held-out prompts. The untrained draft is the trained one's
   initialisation (the same seed). Twice: on the plain random target, whose next-token distributions are nearly
   uniform, and on the same target with its LM head scaled by ``--head-scale`` (the same greedy text, peaked
   distributions), with the target's mean top-token probability recorded for each.

    python benchmarks/v4_drafter.py [--steps 6] [--prompts 64] [--epochs 8] [--head-scale 30]
        [--out benchmarks/results/v4_drafter.json]

Timings share the CPU with whatever else runs (the load average before and after is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

WORLD = 2
# The scaled-down draft: V4-Flash's structure (hc_mult 4, top-k routing with a shared expert, grouped output
# projection, window attention) at a size a 2-core CPU steps in about a second.
SCALED = dict(vocab_size=4096, hidden_size=256, moe_intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=1, head_dim=64, q_lora_rank=128, partial_rotary_factor=0.25, n_routed_experts=16,
              num_experts_per_tok=4, hc_mult=4, hc_sinkhorn_iters=20, sliding_window=32, o_groups=2,
              o_lora_rank=128, layer_types=["sliding_attention"] * 4, mlp_layer_types=["moe"] * 4,
              max_position_embeddings=1024)
BATCH, SEQ = 2, 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int, step: int):
    import torch

    g = torch.Generator().manual_seed(1000 * rank + step)
    V, H = SCALED["vocab_size"], SCALED["hidden_size"]  # features: the backends hand over the mHC streams' mean
    return {"input_ids_BT": torch.randint(0, V, (BATCH, SEQ), generator=g),
            "loss_mask_BT": torch.ones(BATCH, SEQ, dtype=torch.bool),
            "features_BTLH": torch.randn(BATCH, SEQ, 3, H, generator=g),
            "final_BTH": torch.randn(BATCH, SEQ, H, generator=g)}, torch.Generator().manual_seed(step)


def _engine(ep: int):
    import deepspeed
    import torch
    from transformers import AutoConfig

    from dspark.config import DrafterConfig, DSparkConfig
    from dspark.drafters import build_drafter
    from dspark.train.expert_parallel import apply_expert_parallel

    config = AutoConfig.for_model("deepseek_v4", **SCALED)
    torch.manual_seed(0)
    V, H = SCALED["vocab_size"], SCALED["hidden_size"]
    cfg = DrafterConfig(algorithm="dspark_v4", num_layers=3, block_size=5, num_anchors=32,
                        dspark=DSparkConfig(markov_rank=64))
    drafter = build_drafter(cfg, config, [0, 1, 2], torch.randn(V, H), torch.randn(V, H) * 0.05).train()
    if ep > 1:
        apply_expert_parallel(drafter, ep, WORLD)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=drafter, model_parameters=drafter.trainable_parameters(),
                                      config=ds_config)
    experts = sum(p.numel() for n, p in engine.module.named_parameters() if ".experts." in n)
    trained = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    return engine, experts, trained


def _step(engine, rank: int, step: int) -> float:
    """One optimizer step with the trainer's normalisation; returns its wall time in seconds."""
    import torch.distributed as dist

    start = time.perf_counter()
    out = engine(*_batch(rank, step))
    weight_sum = out.weight_sum.detach().float().clone()
    dist.all_reduce(weight_sum)
    engine.backward(out.numerator * WORLD / weight_sum)
    engine.step()
    dist.barrier()
    return time.perf_counter() - start


def _ep_worker(rank: int, port: int, steps: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import deepspeed
    import torch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    engines = {ep: _engine(ep) for ep in (1, 2)}
    times = {ep: [] for ep in engines}
    for step in range(steps + 1):  # step 0 warms up (allocations, first all-reduces) and is not counted
        for ep, (engine, _, _) in engines.items():
            seconds = _step(engine, rank, step)
            if step:
                times[ep].append(seconds)
    record = {ep: {"step_s": times[ep], "routed_expert_params": experts, "trained_params": trained}
              for ep, (_, experts, trained) in engines.items()}
    (Path(out_dir) / f"ep_rank{rank}.json").write_text(json.dumps(record))


def measure_expert_parallel(work: Path, steps: int, timeout_s: float) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_ep_worker, args=(_free_port(), steps, str(work)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the EP 1 / EP 2 runs did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    ranks = [json.loads((work / f"ep_rank{r}.json").read_text()) for r in range(WORLD)]
    result = {}
    for ep in ("1", "2"):
        step_ms = [1000 * statistics.median(r[ep]["step_s"]) for r in ranks]
        result[f"ep{ep}"] = {"median_step_ms": round(max(step_ms), 1),  # the slower rank sets the pace
                             "tokens_per_s": round(WORLD * BATCH * SEQ / (max(step_ms) / 1000), 1),
                             "routed_expert_params_per_rank": [r[ep]["routed_expert_params"] for r in ranks],
                             "trained_params_per_rank": [r[ep]["trained_params"] for r in ranks]}
    result["step_time_ep2_vs_ep1"] = round(result["ep2"]["median_step_ms"] / result["ep1"]["median_step_ms"], 3)
    result["routed_expert_params_ep2_vs_ep1"] = round(result["ep2"]["routed_expert_params_per_rank"][0]
                                                      / result["ep1"]["routed_expert_params_per_rank"][0], 3)
    return result


def _sharpen(target_dir: Path, scale: float) -> None:
    """Multiply the tiny target's LM head by ``scale`` in place: the same argmax everywhere (the same greedy
    text), but peaked next-token distributions instead of the near-uniform ones of a random hidden-64 model."""
    from safetensors.torch import load_file, save_file

    path = target_dir / "model.safetensors"
    tensors = load_file(path)
    tensors["head.weight"] = tensors["head.weight"] * scale  # transformers' DeepSeek-V4 names its LM head "head"
    save_file(tensors, path, metadata={"format": "pt"})


def _mean_top_prob(target, prompts: list[list[int]]) -> float:
    """The target's mean probability of its own argmax over the prompts' positions (1/vocab = uniform)."""
    import torch

    tops = []
    with torch.no_grad():
        for ids in prompts:
            logits = target.model(input_ids=torch.tensor([ids])).logits[0].float()
            tops.append(logits.softmax(-1).max(-1).values)
    return float(torch.cat(tops).mean())


def measure_acceptance(work: Path, prompts: int, epochs: int, head_scale: float) -> dict:
    """tiny_deepseek_v4_dspark end to end in this process: regenerate, cache, train, then speculative decoding at
    T=0 with the trained draft and with its untrained initialisation; with ``head_scale`` != 1 on the tiny target
    with its LM head scaled (``_sharpen``)."""
    from dspark import stages
    from dspark.config import load_config
    from dspark.data.chat import prompt_ids
    from dspark.data.prompts import load_prompts
    from dspark.targets import load_target
    from dspark.targets.tiny import make_tiny_target, smollm2_tokenizer

    name = f"x{head_scale:g}"
    target_dir = work / f"tiny-v4-{name}"
    if not (target_dir / "config.json").exists():
        make_tiny_target(target_dir, "deepseek_v4", smollm2_tokenizer(work / "tokenizer"))
        if head_scale != 1:
            _sharpen(target_dir, head_scale)
    cfg = load_config("tiny_deepseek_v4_dspark", [
        f"run_dir={work / f'run-{name}'}", f"target.name_or_path={target_dir}", f"data.max_prompts={prompts}",
        "data.max_new_tokens=48", "data.num_eval_prompts=8", f"train.num_epochs={epochs}", "train.resume=false",
        "eval.num_prompts=8", "eval.max_new_tokens=32", "eval.temperatures=[0.0]"])
    target = load_target(cfg.target)
    stages.prepare(cfg, target=target, progress=False)
    stages.build_cache(cfg, target=target, progress=False)
    start = time.perf_counter()
    trained = stages.train(cfg, progress=False)
    train_s = time.perf_counter() - start
    report = stages.evaluate(cfg, target=target, progress=False)["T0"]
    sample = [prompt_ids(target.tokenizer, p) for p in load_prompts("builtin", 8)]
    out = {"lm_head_scale": head_scale, "target_mean_top_prob": round(_mean_top_prob(target, sample), 6),
           "uniform_prob": round(1 / target.config.vocab_size, 6), "train_steps": trained.steps,
           "train_s": round(train_s, 1), "final_loss": round(trained.final_loss, 4),
           "eval_prompts": cfg.eval.num_prompts, "new_tokens_per_prompt": cfg.eval.max_new_tokens}
    for name in ("untrained", "trained"):
        out[name] = {"tau": round(report[name]["tau"], 3), "num_rounds": report[name]["num_rounds"],
                     "acceptance_by_position": [None if a is None else round(a, 3)
                                                for a in report[name]["acceptance_K"]]}
    out["tau_trained_vs_untrained"] = round(out["trained"]["tau"] / out["untrained"]["tau"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench_v4_drafter", help="scratch directory")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per EP setting (after one warm-up)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts regenerated for training the tiny draft")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--head-scale", type=float, default=30.0,
                        help="LM-head scale of the second, peaked tiny target (the first is the plain random one)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default="benchmarks/results/v4_drafter.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    ep = measure_expert_parallel(work, args.steps, args.timeout)
    print(f"expert parallel: {json.dumps(ep)}", flush=True)
    acceptance = {f"lm_head_x{scale:g}": measure_acceptance(work, args.prompts, args.epochs, scale)
                  for scale in (1.0, args.head_scale)}
    print(f"acceptance: {json.dumps(acceptance)}", flush=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "scaled_down_draft": {**{k: v for k, v in SCALED.items() if not k.endswith("_types")}, "stages": 3,
                              "batch": BATCH, "seq": SEQ, "anchors": 32, "world_size": WORLD, "zero_stage": 0},
        "expert_parallel": ep, "acceptance_T0": acceptance,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
