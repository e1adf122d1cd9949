"""Benchmark: feature codecs on real hidden states read back from a built cache.

For each codec and zstd level: bytes/token of the feature + final-hidden fields, ratio vs raw bf16 (the
baseline, measured in the same run), and single-thread (per core) compress / decompress MB/s of raw bf16 input.
The lossless codecs must round-trip bit-exactly; for the lossy ``fp8`` the error vs the bf16 input is reported
(max and mean relative error over elements in e4m3's normal range, whose bound is 2**-4 + 2**-9, and the mean
cosine similarity of token rows). The states are real: read back from a cache built by ``dspark demo`` /
``dspark cache build`` on SmolLM2-135M-Instruct. Timings share the CPU with whatever else runs.

    python benchmarks/cache_codecs.py --cache runs/smollm2_dspark/cache [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def fp8_error(tensors, decoded) -> dict:
    """Relative error over elements in e4m3's normal range, and token-row cosine similarity."""
    import torch

    max_rel, rel_sum, count, cos_sum, rows = 0.0, 0.0, 0, 0.0, 0
    for x, y in zip(tensors, decoded):
        x_RH, y_RH = x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, x.shape[-1])
        normal = x_RH.abs() >= 2**-6 * x_RH.abs().amax(dim=1, keepdim=True) / 448
        rel = ((y_RH - x_RH).abs() / x_RH.abs())[normal]
        max_rel, rel_sum, count = max(max_rel, float(rel.max())), rel_sum + float(rel.sum()), count + rel.numel()
        cos_sum += float(torch.nn.functional.cosine_similarity(x_RH, y_RH, dim=1).sum())
        rows += x_RH.shape[0]
    return {"max_rel_error_normal": round(max_rel, 5), "mean_rel_error_normal": round(rel_sum / count, 5),
            "bound_rel_error_normal": 2**-4 + 2**-9, "mean_row_cosine": round(cos_sum / rows, 6)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default="runs/smollm2_dspark/cache")
    parser.add_argument("--max-samples", type=int, default=32)
    parser.add_argument("--levels", default="1,3,9")
    parser.add_argument("--out", default="benchmarks/results/cache_codecs.json")
    args = parser.parse_args()

    import torch

    from dspark.cache import CacheReader
    from dspark.cache.codecs import get_codec

    torch.set_num_threads(1)
    reader = CacheReader(args.cache)
    samples = [reader[i] for i in range(min(args.max_samples, len(reader)))]
    tensors = [t for s in samples for t in (s["features_TLH"], s["final_TH"])]
    num_tokens = sum(int(s["input_ids"].numel()) for s in samples)
    raw_bytes = sum(t.numel() * 2 for t in tensors)

    rows = []
    zstd_levels = [int(x) for x in args.levels.split(",")]
    for codec_name, levels in (("raw", [0]), ("bf16", zstd_levels), ("fp8", zstd_levels)):
        codec = get_codec(codec_name)
        for level in levels:
            start = time.perf_counter()
            blobs = [codec.encode(t, level) for t in tensors]
            enc_s = time.perf_counter() - start
            start = time.perf_counter()
            for blob, t in zip(blobs, tensors):
                out = codec.decode(blob, tuple(t.shape))
            dec_s = time.perf_counter() - start
            size = sum(len(b) for b in blobs)
            row = {"codec": codec_name, "zstd_level": level if codec_name != "raw" else None,
                   "feature_bytes_per_token": round(size / num_tokens, 1),
                   "ratio_vs_raw_bf16": round(raw_bytes / size, 3),
                   "compress_MBps_1thread": round(raw_bytes / enc_s / 1e6, 1),
                   "decompress_MBps_1thread": round(raw_bytes / dec_s / 1e6, 1)}
            if codec.lossless:
                assert torch.equal(out.view(torch.int16), tensors[-1].view(torch.int16))
            else:
                row.update(fp8_error(tensors, [codec.decode(b, tuple(t.shape)) for b, t in zip(blobs, tensors)]))
            rows.append(row)
    result = {"cache": args.cache, "target": reader.identity.name, "layer_ids": reader.identity.layer_ids,
              "hidden_size": reader.identity.hidden_size, "samples": len(samples), "tokens": num_tokens,
              "codecs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
