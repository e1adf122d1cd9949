"""Benchmark: one training step (forward_loss + backward + AdamW) of each drafter algorithm, on this machine's device.

The drafters are sized for SmolLM2-135M (hidden 576, vocab 49152, 5 feature layers, the smollm2_* recipes) and fed
random target features of a fixed batch, so the figure is the drafter's own cost, free of data loading. Block
tokens/s (supervised block slots per second) is reported per algorithm and precision, with every row's ratio to
DSpark in fp32 measured in the same run. Also the peak device memory (GPU) or peak RSS (CPU).

    python benchmarks/drafter_step.py [--device cuda] [--steps 10] [--batch 4 --seq 512] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

RECIPES = {"dspark": "smollm2_dspark", "dflash": "smollm2_dflash", "eagle3": "smollm2_eagle3"}


def _batch(B: int, T: int, L: int, H: int, V: int, device, dtype, generator):
    import torch

    ids_BT = torch.randint(0, V, (B, T), generator=generator)
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    mask_BT[:, T // 4:] = True  # a prompt, then a supervised answer
    return {"input_ids_BT": ids_BT.to(device), "loss_mask_BT": mask_BT.to(device),
            "features_BTLH": torch.randn(B, T, L, H, generator=generator).to(device, dtype),
            "final_BTH": torch.randn(B, T, H, generator=generator).to(device, dtype)}


def measure(algorithm: str, precision: str, args) -> dict:
    import torch
    from transformers import AutoConfig

    from dspark.config import load_config
    from dspark.drafters import build_drafter
    from dspark.train.metrics import peak_rss_gb

    cfg = load_config(RECIPES[algorithm])
    # SmolLM2-135M's architecture (the builtin target), without loading its weights: the frozen embedding and
    # LM head are random tensors of the real shapes.
    config = AutoConfig.for_model("llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                                  rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    embed_VH = (torch.randn(49152, 576, generator=gen) * 0.02).to(device, dtype)
    torch.manual_seed(0)
    drafter = build_drafter(cfg.drafter, config, cfg.target.layer_ids, embed_VH, embed_VH).to(device, dtype)
    optimizer = torch.optim.AdamW(drafter.trainable_parameters(), lr=1e-4)
    batch = _batch(args.batch, args.seq, len(cfg.target.layer_ids), 576, 49152, device, dtype, gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> int:
        out = drafter.forward_loss(batch, torch.Generator(device=device).manual_seed(1))
        (out.numerator / out.weight_sum.clamp_min(1e-6)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(out.num_tokens)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, tokens = time.perf_counter(), 0
    for _ in range(args.steps):
        tokens += step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gb()
    return {"algorithm": algorithm, "precision": precision, "step_ms": round(1000 * wall / args.steps, 2),
            "block_tokens_per_step": tokens // args.steps, "block_tokens_per_s": round(tokens / wall, 1),
            "peak_memory_gb": round(peak, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--algorithms", default=",".join(RECIPES))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/drafter_step.json")
    args = parser.parse_args()

    import torch

    rows = [measure(a, p, args) for a in args.algorithms.split(",") for p in args.precisions.split(",")]
    base = next((r for r in rows if r["algorithm"] == "dspark" and r["precision"] == "fp32"), rows[0])
    for row in rows:
        row["tokens_per_s_vs_dspark_fp32"] = round(row["block_tokens_per_s"] / base["block_tokens_per_s"], 3)
        print(json.dumps(row))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    result = {"device": args.device, "device_name": device_name or platform.machine(), "torch": torch.__version__,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": torch.get_num_threads(),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
