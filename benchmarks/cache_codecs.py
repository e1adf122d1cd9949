"""Benchmark: feature codecs on real hidden states read back from a built cache.

For each codec and zstd level: bytes/token of the feature + final-hidden fields, ratio vs raw bf16 (the
baseline, measured in the same run), and single-thread compress / decompress MB/s of raw bf16 input.

    python benchmarks/cache_codecs.py --cache runs/smollm2_dspark/cache [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


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
    for codec_name, levels in (("raw", [0]), ("bf16", [int(x) for x in args.levels.split(",")])):
        codec = get_codec(codec_name)
        for level in levels:
            start = time.perf_counter()
            blobs = [codec.encode(t, level) for t in tensors]
            enc_s = time.perf_counter() - start
            start = time.perf_counter()
            for blob, t in zip(blobs, tensors):
                out = codec.decode(blob, tuple(t.shape))
            dec_s = time.perf_counter() - start
            assert torch.equal(out.view(torch.int16), tensors[-1].view(torch.int16))  # lossless
            size = sum(len(b) for b in blobs)
            rows.append({"codec": codec_name, "zstd_level": level if codec_name != "raw" else None,
                         "feature_bytes_per_token": round(size / num_tokens, 1),
                         "ratio_vs_raw_bf16": round(raw_bytes / size, 3),
                         "compress_MBps_1thread": round(raw_bytes / enc_s / 1e6, 1),
                         "decompress_MBps_1thread": round(raw_bytes / dec_s / 1e6, 1)})
    result = {"cache": args.cache, "target": reader.identity.name, "layer_ids": reader.identity.layer_ids,
              "hidden_size": reader.identity.hidden_size, "samples": len(samples), "tokens": num_tokens,
              "codecs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
