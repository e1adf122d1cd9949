"""Benchmark: the default pipeline (`dspark demo`) stage by stage, with tau and cache size.

Writes JSON (default benchmarks/results/demo_pipeline.json): wall seconds per stage, trained vs untrained
tau at each temperature (the untrained drafter is the baseline measured in the same run), cache bytes/token
and its ratio to raw bf16, training block tokens/s and peak RSS.

    python benchmarks/demo_pipeline.py [--config smollm2_dspark] [--set key=value ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="smollm2_dspark")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default="benchmarks/results/demo_pipeline.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from dspark.cache.build import inspect_cache
    from dspark.config import load_config
    from dspark.demo import run_demo
    from dspark.train.metrics import peak_rss_gb

    cfg = load_config(args.config, args.overrides)
    if Path(cfg.run_dir).exists() and any(Path(cfg.run_dir).iterdir()):
        # A leftover run would be resumed, not measured.
        raise SystemExit(f"{cfg.run_dir} is not empty: move it away or pass --set run_dir=NEW_DIR")
    start = time.perf_counter()
    summary = run_demo(cfg)
    total = time.perf_counter() - start
    cache = inspect_cache(Path(cfg.run_dir) / "cache")
    metrics = [json.loads(line) for line in (Path(cfg.run_dir) / "tensorboard" / "metrics.jsonl").open()
               if '"loss/total"' in line]
    tau = summary["tau"]
    result = {
        "config": args.config, "overrides": args.overrides, "total_seconds": round(total, 1),
        "stage_seconds": summary["stage_seconds"],
        "tau": tau,
        "tau_ratio_trained_vs_untrained": {t: round(v["trained"] / v["untrained"], 3) for t, v in tau.items()},
        "train_steps": summary["train_steps"],
        "train_block_tokens_per_s_mean": round(sum(m["tokens_per_s"] for m in metrics) / len(metrics), 1),
        "cache_bytes_per_token": round(cache["bytes_per_token"], 1),
        "cache_ratio_vs_raw_bf16": round(cache["ratio_vs_raw_bf16"], 3),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
