"""Benchmark: streaming reader throughput on a cache of real hidden states.

Re-encodes the first ``--max-samples`` samples of a built cache (SmolLM2-135M-Instruct states from
``dspark demo`` / ``dspark cache build``) with each codec into a temp dir, then times one epoch of
``CacheReader.stream`` per setting: decoding inline (prefetch off), on 1 or 2 background threads (prefetch on),
and through a torch DataLoader with 1 or 2 worker processes. ``--consumer-ms`` adds a simulated training step
per sample (a sleep: the GIL is free, as during a GPU step), which is where prefetching pays off. Rates are
steady state (first to last sample; the first sample's latency, which includes worker start-up, is reported
apart), best of ``--repeats`` epochs; timings share the CPU with whatever else runs.

    python benchmarks/cache_reader.py --cache runs/smollm2_dspark/cache [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _one_thread(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)


def time_epoch(reader, setting: dict, consumer_s: float, repeats: int) -> tuple[float, float, int, int]:
    """Best (seconds to the first sample, seconds from the first to the last) of one epoch, samples, tokens.

    Splitting off the first sample keeps worker start-up (fork, imports) out of the steady-state rate."""
    import torch

    best, best_startup, samples, tokens = float("inf"), float("inf"), 0, 0
    for epoch in range(repeats):
        stream = reader.stream(seed=0, epoch=epoch, num_threads=setting["threads"], prefetch=setting["prefetch"])
        source = stream
        if setting["loader_workers"]:
            source = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=setting["loader_workers"],
                                                 worker_init_fn=_one_thread, timeout=300)
        start = time.perf_counter()
        first = None
        samples = tokens = 0
        for sample in source:
            first = first or time.perf_counter()
            samples += 1
            tokens += int(sample["input_ids"].numel())
            if consumer_s:
                time.sleep(consumer_s)
        best, best_startup = min(best, time.perf_counter() - first), min(best_startup, first - start)
    return best_startup, best, samples, tokens


SETTINGS = [
    {"name": "inline, prefetch off", "threads": 0, "prefetch": 0, "loader_workers": 0},
    {"name": "1 decode thread, prefetch 8", "threads": 1, "prefetch": 8, "loader_workers": 0},
    {"name": "2 decode threads, prefetch 8", "threads": 2, "prefetch": 8, "loader_workers": 0},
    {"name": "DataLoader 1 worker, prefetch off", "threads": 0, "prefetch": 0, "loader_workers": 1},
    {"name": "DataLoader 2 workers, prefetch off", "threads": 0, "prefetch": 0, "loader_workers": 2},
    {"name": "DataLoader 2 workers, 1 thread + prefetch 8", "threads": 1, "prefetch": 8, "loader_workers": 2},
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default="runs/smollm2_dspark/cache")
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--codecs", default="bf16,fp8")
    parser.add_argument("--consumer-ms", default="0,5", help="simulated per-sample training time(s), comma list")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/cache_reader.json")
    args = parser.parse_args()

    import torch

    from dspark.cache import CacheReader, CacheWriter, finalize_cache

    torch.set_num_threads(1)
    source = CacheReader(args.cache)
    samples = [source[i] for i in range(min(args.max_samples, len(source)))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec in args.codecs.split(","):
            out_dir = Path(tmp) / codec
            with CacheWriter(out_dir, source.identity, codec=codec, zstd_level=3, samples_per_shard=16) as writer:
                for sample in samples:
                    writer.add(sample)
            finalize_cache(out_dir, source.identity)
            reader = CacheReader(out_dir, shuffle_buffer=1024)
            decoded_bytes = sum(2 * (s["features_TLH"].numel() + s["final_TH"].numel()) for s in samples)
            for consumer_ms in (float(x) for x in args.consumer_ms.split(",")):
                for setting in SETTINGS:
                    startup, wall, n, tokens = time_epoch(reader, setting, consumer_ms / 1e3, args.repeats)
                    assert n == len(samples)
                    rate = (n - 1) / wall  # steady state: the first sample's latency is reported apart
                    rows.append({"codec": codec, "consumer_ms_per_sample": consumer_ms, "setting": setting["name"],
                                 "first_sample_s": round(startup, 3), "samples_per_s": round(rate, 1),
                                 "tokens_per_s": round(rate * tokens / n),
                                 "decoded_MBps": round(rate * decoded_bytes / n / 1e6, 1),
                                 "consumer_bound_samples_per_s": round(1e3 / consumer_ms, 1) if consumer_ms else None})
                    print(json.dumps(rows[-1]))
    result = {"cache": args.cache, "target": source.identity.name, "layer_ids": source.identity.layer_ids,
              "hidden_size": source.identity.hidden_size, "samples": len(samples),
              "tokens": sum(int(s["input_ids"].numel()) for s in samples), "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
