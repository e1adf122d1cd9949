"""Sizing on paper: how many H200s each target backend needs for a DeepSeek-V4-class target (and Qwen3-235B-A22B,
Gemma4-12B), and how long hidden-state
capture of a corpus takes. Every number is derived in the open (printed as arithmetic), from parameter counts of
the real architecture built on the meta device (no weights are allocated or downloaded).

    python tools/size_targets.py [--tokens 1.24e9] [--json benchmarks/results/sizing.json]

Assumptions (each a flag): weights hosted in bf16 (2 B/param; our backends dequantise the FP8/FP4 checkpoint);
141 GB per H200 of which ``--reserve`` is kept for activations, the gathered layer and workspace; capture is a
prefill, 2 x active params FLOPs per token (attention FLOPs left out: at 2-4K tokens with compressed attention
they are a few percent); ``--mfu`` of 989 TFLOP/s dense bf16; 8 GPUs per node with 900 GB/s NVLink and 50 GB/s of
InfiniBand per GPU.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

GB = 1e9
# DeepSeek-V4-Flash is transformers' DeepseekV4Config default (284B); V4-Pro (1.6T) differs in these fields
# (published config.json: hidden 7168, 61 layers, 128 heads, 384 routed experts of width 3072, 16 output groups).
# Each target: its transformers model_type and the fields that differ from that config class's defaults.
# Qwen3-235B-A22B: its published config.json. Gemma4-12B: the text decoder the gemma4_12b_* recipes assume
# (48 layers of hidden 3840, Gemma 3 12B's dimensions with Gemma4's 5:1 sliding/global layout and 262k vocab);
# Gemma4's published 12B config was not available offline, so its row is an estimate of that shape.
TARGETS = {
    "DeepSeek-V4-Flash": {"model_type": "deepseek_v4"},
    "DeepSeek-V4-Pro": {"model_type": "deepseek_v4", "hidden_size": 7168, "num_hidden_layers": 61,
                        "num_attention_heads": 128, "q_lora_rank": 1536, "o_groups": 16, "o_lora_rank": 1024,
                        "n_routed_experts": 384, "moe_intermediate_size": 3072},
    "Qwen3-235B-A22B": {"model_type": "qwen3_moe", "hidden_size": 4096, "num_hidden_layers": 94,
                        "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
                        "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_experts": 128,
                        "num_experts_per_tok": 8, "vocab_size": 151936, "tie_word_embeddings": False},
    "Gemma4-12B": {"model_type": "gemma4_text", "hidden_size": 3840, "num_hidden_layers": 48,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
                   "num_global_key_value_heads": 4, "attention_k_eq_v": True, "intermediate_size": 15360,
                   "hidden_size_per_layer_input": 0, "vocab_size": 262144, "final_logit_softcapping": 30.0},
}


def count_params(spec: dict) -> dict:
    """Parameter counts of the architecture, built on the meta device (dense models: no routed experts)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = dict(spec)
    cfg = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = routed = embed = lm_head = 0
    largest_layer = 0
    for i, layer in enumerate(model.model.layers):
        size = sum(p.numel() for p in layer.parameters())
        largest_layer = max(largest_layer, size)
        routed += sum(p.numel() for n, p in layer.named_parameters() if ".experts." in f".{n}")
    for name, p in model.named_parameters():
        total += p.numel()
        embed += p.numel() if name.endswith("embed_tokens.weight") else 0
        lm_head += p.numel() if name == "lm_head.weight" else 0
    experts = getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_experts", None) or 0
    top_k = getattr(cfg, "num_experts_per_tok", None) or 0 if experts else 0
    active = total - embed - routed + (routed * top_k / experts if experts else 0)
    return {"total": total, "routed_experts": routed, "embedding": embed, "lm_head": lm_head,
            "active_per_token": active, "largest_layer": largest_layer, "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "experts": experts, "top_k": top_k}


def size(name: str, p: dict, a) -> dict:
    budget = a.gpu_gb * (1 - a.reserve)
    weights = p["total"] * 2 / GB
    layer = p["largest_layer"] * 2 / GB
    lines = [(f"{name}: {p['total'] / 1e9:.1f}B params x 2 B = {weights:.0f} GB bf16; usable per GPU "
             f"{a.gpu_gb:.0f} GB x (1 - {a.reserve}) = {budget:.0f} GB")]
    gpus = {}
    gpus["hf / DeepSpec (whole model per GPU)"] = 1 if weights <= budget else None
    lines.append(f"  hf: needs {weights:.0f} GB on one GPU -> {'fits' if weights <= budget else 'impossible'}")
    # ZeRO-3: 1/N of the weights resident plus one gathered layer (and its prefetched successor).
    n = math.ceil(weights / (budget - 2 * layer))
    gpus["zero3"] = n
    lines.append(f"  zero3: N >= {weights:.0f} / ({budget:.0f} - 2 x {layer:.1f} GB gathered layers) -> {n}")
    # Pipeline and Megatron TP x EP: weights split with no replica; a stage/shard must still fit.
    n = max(math.ceil(weights / budget), 1)
    gpus["pipeline"] = n
    gpus["megatron (TP 8 x EP)"] = math.ceil(n / 8) * 8
    lines.append(f"  pipeline: N >= {weights:.0f} / {budget:.0f} = {n} stages (largest layer {layer:.1f} GB fits)")
    lines.append(f"  megatron: TP 8 inside a node, experts split over nodes -> {gpus['megatron (TP 8 x EP)']} GPUs")

    # Capture throughput per GPU: compute bound at mfu, or (zero3) bound by gathering the weights once per
    # micro batch; the per-rank batch amortises the gather.
    flops_per_token = 2 * p["active_per_token"]
    compute_tps = a.peak_tflops * 1e12 * a.mfu / flops_per_token
    lines.append(f"  compute: 2 x {p['active_per_token'] / 1e9:.1f}B active = {flops_per_token / 1e9:.0f} GFLOP/token;"
                 f" {a.peak_tflops:.0f} TFLOP/s x {a.mfu} MFU -> {compute_tps:,.0f} tokens/s per GPU")
    out = {"params_b": round(p["total"] / 1e9, 1), "active_b": round(p["active_per_token"] / 1e9, 1),
           "weights_gb_bf16": round(weights), "largest_layer_gb": round(layer, 1), "min_gpus": gpus,
           "per_backend": {}}
    for backend, n in gpus.items():
        if n is None:
            out["per_backend"][backend] = None
            continue
        nodes = math.ceil(n / 8)
        gpus_used = nodes * 8
        tps_gpu = compute_tps
        note = "compute bound"
        if backend == "zero3":
            # Each rank receives (N-1)/N of the weights per forward over IB (or NVLink within one node).
            bw = a.nvlink_gbs if nodes == 1 else a.ib_gbs
            gather_s = weights * (gpus_used - 1) / gpus_used / bw
            comm_tps = a.batch_tokens / gather_s
            note = (f"gather {weights:.0f} GB x {gpus_used - 1}/{gpus_used} / {bw:.0f} GB/s = {gather_s:.1f} s per "
                    f"{a.batch_tokens:,} tokens -> {comm_tps:,.0f} tokens/s per GPU")
            tps_gpu = min(compute_tps, comm_tps)
        elif backend == "pipeline":
            # One sequence stream through the stages: a stage idles (S-1)/(M+S-1) of the time with M micro batches.
            bubble = (gpus_used - 1) / (a.micro_batches + gpus_used - 1)
            tps_gpu = compute_tps * (1 - bubble)
            note = f"bubble ({gpus_used}-1)/({a.micro_batches}+{gpus_used}-1) = {bubble:.2f}"
        total_tps = tps_gpu * gpus_used
        hours = a.tokens / total_tps / 3600
        out["per_backend"][backend] = {"gpus": gpus_used, "nodes": nodes, "tokens_per_s": round(total_tps),
                                       "hours": round(hours, 1), "gpu_hours": round(hours * gpus_used),
                                       "note": note}
        lines.append(f"  {backend}: {gpus_used} GPUs ({nodes} nodes) x {tps_gpu:,.0f} tokens/s = {total_tps:,.0f} "
                     f"tokens/s; {a.tokens:.3g} tokens -> {hours:.1f} h = {hours * gpus_used:,.0f} GPU-hours ({note})")
    out["arithmetic"] = lines
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=1.24e9, help="corpus tokens to capture")
    parser.add_argument("--gpu-gb", type=float, default=141.0)
    parser.add_argument("--reserve", type=float, default=0.15, help="fraction of GPU memory kept free")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU")
    parser.add_argument("--mfu", type=float, default=0.3, help="fraction of peak reached by the prefill")
    parser.add_argument("--nvlink-gbs", type=float, default=900.0)
    parser.add_argument("--ib-gbs", type=float, default=50.0, help="InfiniBand GB/s per GPU (400 Gb/s)")
    parser.add_argument("--batch-tokens", type=int, default=65536, help="tokens per rank per forward (zero3)")
    parser.add_argument("--micro-batches", type=int, default=64, help="micro batches in flight (pipeline)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args()

    result = {"assumptions": {k: v for k, v in vars(args).items() if k != "json"}, "targets": {}}
    for name, overrides in TARGETS.items():
        sized = size(name, count_params(overrides), args)
        result["targets"][name] = sized
        print("\n".join(sized["arithmetic"]), end="\n\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
