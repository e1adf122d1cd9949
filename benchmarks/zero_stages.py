"""Benchmark: drafter training throughput and peak memory per rank for ZeRO 0, 1, 2 and 3 on 2 gloo processes.

Each stage is a fresh 2-process run (``torch.multiprocessing`` spawn, gloo, the real trainer and DeepSpeed engine)
over the same tiny-llama cache, so each process's peak RSS belongs to one stage only. Reported per stage: block
tokens/s over all ranks (the trainer's own count: supervised block tokens / training-loop wall time, engine
set-up excluded), the peak RSS of each rank, and both as a ratio to ZeRO 0. The drafter uses the real Markov rank
(256) so that its optimizer state (~100M fp32 values over a 49k vocabulary) is visible next to the ~0.7 GB a
process needs for torch + DeepSpeed + the target. Timings share the CPU with whatever else runs.

    python benchmarks/zero_stages.py [--epochs 3] [--out benchmarks/results/zero_stages.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

STAGES = (0, 1, 2, 3)
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(run_dir: Path, target_dir: Path, stage: int, epochs: int, markov_rank: int) -> list[str]:
    return [f"run_dir={run_dir}", f"target.name_or_path={target_dir}", f"train.zero_stage={stage}",
            f"train.num_epochs={epochs}", "train.micro_batch_size=2", "train.num_threads=1",
            f"drafter.dspark.markov_rank={markov_rank}", "train.resume=false"]


def _worker(rank: int, port: int, cache_dir: str, run_dir: str, target_dir: str, stage: int, epochs: int,
            markov_rank: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    from dspark.config import load_config
    from dspark.train.metrics import peak_rss_gb
    from dspark.train.trainer import train

    cfg = load_config("tiny_llama_dspark", _overrides(Path(run_dir), Path(target_dir), stage, epochs, markov_rank))
    result = train(cfg, cache_dir=Path(cache_dir), progress=False)
    record = {"rank": rank, "steps": result.steps, "tokens_per_s": result.tokens_per_s, "wall_s": result.wall_s,
              "final_loss": result.final_loss, "peak_rss_gb": peak_rss_gb()}
    (Path(run_dir) / f"bench_rank{rank}.json").write_text(json.dumps(record))


def _run_stage(work: Path, cache_dir: Path, target_dir: Path, stage: int, epochs: int, markov_rank: int,
               timeout_s: float) -> list[dict]:
    import torch.multiprocessing as mp

    run_dir = work / f"zero{stage}"
    ctx = mp.start_processes(_worker, args=(_free_port(), str(cache_dir), str(run_dir), str(target_dir), stage,
                                            epochs, markov_rank), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ZeRO {stage} run did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [json.loads((run_dir / f"bench_rank{r}.json").read_text()) for r in range(WORLD)]


def _prepare(work: Path) -> tuple[Path, Path]:
    """A tiny llama target and its cache (20 training conversations of <= 32 answer tokens)."""
    from dspark.config import load_config
    from dspark.stages import build_cache, prepare
    from dspark.targets import load_target
    from dspark.targets.tiny import make_tiny_target, smollm2_tokenizer

    target_dir = make_tiny_target(work / "tiny-llama", "llama", smollm2_tokenizer(work / "tokenizer"))
    cfg = load_config("tiny_llama_dspark", [f"run_dir={work / 'prep'}", f"target.name_or_path={target_dir}"])
    target = load_target(cfg.target)
    prepare(cfg, target=target, progress=False)
    return target_dir, build_cache(cfg, target=target, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench_zero_stages", help="scratch directory (target, cache, runs)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of 5 optimizer steps each")
    parser.add_argument("--markov-rank", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per stage before giving up")
    parser.add_argument("--out", default="benchmarks/results/zero_stages.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    target_dir, cache_dir = _prepare(work)
    stages = {}
    for stage in STAGES:
        ranks = _run_stage(work, cache_dir, target_dir, stage, args.epochs, args.markov_rank, args.timeout)
        stages[f"zero{stage}"] = {
            "tokens_per_s": round(ranks[0]["tokens_per_s"], 1),  # every rank reports the all-rank rate
            "peak_rss_gb_per_rank": [round(r["peak_rss_gb"], 3) for r in ranks],
            "steps": ranks[0]["steps"], "train_wall_s": round(max(r["wall_s"] for r in ranks), 2),
            "final_loss": round(ranks[0]["final_loss"], 5),
        }
        print(f"zero{stage}: {stages[f'zero{stage}']}", flush=True)
    base = stages["zero0"]
    for entry in stages.values():
        entry["tokens_per_s_vs_zero0"] = round(entry["tokens_per_s"] / base["tokens_per_s"], 3)
        entry["peak_rss_vs_zero0_per_rank"] = [round(a / b, 3) for a, b in zip(entry["peak_rss_gb_per_rank"],
                                                                              base["peak_rss_gb_per_rank"])]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "world_size": WORLD, "backend": "gloo (CPU)", "drafter_markov_rank": args.markov_rank,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
        "stages": stages,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
