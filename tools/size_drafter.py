"""Sizing on paper of DeepSeek-V4's mtp.* DSpark draft (``dspark_v4``) for V4-Flash and V4-Pro: parameters (total
and active per token) counted on the meta device, and training memory per rank at expert-parallel sizes 1/8/16
with ZeRO, every number printed with its arithmetic.

    python tools/size_drafter.py [--world 16] [--json benchmarks/results/drafter_sizing.json]

Memory model (weights, gradients and optimizer states; activations, the hosted target and workspace excluded):
bf16 weights and gradients (2 B each) with fp32 master weights and two Adam moments (12 B) per trained parameter.
The dense trained part (attention, mHC, norms, router, shared experts, main_proj, heads) is replicated and ZeRO-2
partitions its gradients and optimizer states over all ``world`` ranks. Routed experts are split over the EP group
(each rank holds E / EP experts' bf16 weights) and ZeRO-2 partitions their gradients and optimizer states over the
expert-data-parallel group (world / EP ranks), i.e. also over ``world`` in total. The frozen embedding and LM head
are bf16 copies on every rank.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from size_targets import TARGETS  # noqa: E402  (the V4-Pro config fields, kept in one place)

GB = 1e9
RELEASED = {"DeepSeek-V4-Flash": {"layer_ids": [40, 41, 42], "markov_rank": 256},
            "DeepSeek-V4-Pro": {"layer_ids": [58, 59, 60], "markov_rank": 512}}


def count_params(name: str) -> dict:
    """Parameter counts of the released draft's architecture, built on the meta device."""
    import torch
    from transformers import DeepseekV4Config

    from dspark.config import DrafterConfig, DSparkConfig
    from dspark.drafters.v4 import DSparkV4Drafter

    config = DeepseekV4Config(**TARGETS[name])
    released = RELEASED[name]
    with torch.device("meta"):
        frozen = torch.empty(config.vocab_size, config.hidden_size)
        drafter = DSparkV4Drafter(DrafterConfig(algorithm="dspark_v4", num_layers=3, block_size=5,
                                                dspark=DSparkConfig(markov_rank=released["markov_rank"]),
                                                mask_token_id=128799),
                                  config, released["layer_ids"], frozen, frozen)
    routed = sum(p.numel() for n, p in drafter.named_parameters() if ".experts." in n and "shared" not in n)
    trained = sum(p.numel() for p in drafter.parameters())
    dense = trained - routed
    embed = head = config.vocab_size * config.hidden_size
    active = dense + routed * config.num_experts_per_tok / config.n_routed_experts + head
    return {"trained": trained, "routed_experts": routed, "dense_trained": dense, "frozen_embed_head": embed + head,
            "total_with_frozen": trained + embed + head, "active_per_token": active,
            "experts": config.n_routed_experts, "top_k": config.num_experts_per_tok}


def memory(p: dict, world: int, ep: int) -> dict:
    dense = 2 * p["dense_trained"] + 14 * p["dense_trained"] / world
    experts = 2 * p["routed_experts"] / ep + 14 * p["routed_experts"] / world
    frozen = 2 * p["frozen_embed_head"]
    return {"ep": ep, "dense_gb": dense / GB, "experts_gb": experts / GB, "frozen_gb": frozen / GB,
            "total_gb": (dense + experts + frozen) / GB,
            "arithmetic": (f"dense 2x{p['dense_trained'] / 1e9:.3f}B + 14x{p['dense_trained'] / 1e9:.3f}B/{world} = "
                           f"{dense / GB:.1f} GB; experts 2x{p['routed_experts'] / 1e9:.2f}B/{ep} + "
                           f"14x{p['routed_experts'] / 1e9:.2f}B/{world} = {experts / GB:.1f} GB; frozen "
                           f"2x{p['frozen_embed_head'] / 1e9:.2f}B = {frozen / GB:.1f} GB; total "
                           f"{(dense + experts + frozen) / GB:.1f} GB")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=16, help="GPUs in the training job")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = {}
    for name in RELEASED:
        p = count_params(name)
        print(f"{name} draft: {p['trained'] / 1e9:.2f}B trained ({p['routed_experts'] / 1e9:.2f}B routed experts, "
              f"{p['dense_trained'] / 1e9:.3f}B dense) + {p['frozen_embed_head'] / 1e9:.2f}B frozen embed/head = "
              f"{p['total_with_frozen'] / 1e9:.2f}B; active per token {p['dense_trained'] / 1e9:.3f}B + "
              f"{p['routed_experts'] / 1e9:.2f}B x {p['top_k']}/{p['experts']} + head = "
              f"{p['active_per_token'] / 1e9:.2f}B")
        rows = [memory(p, args.world, ep) for ep in (1, 8, 16)]
        for row in rows:
            print(f"  EP {row['ep']:>2} of {args.world} ranks, ZeRO-2: {row['arithmetic']}")
        report[name] = {"params": p, "memory_per_rank": rows, "world": args.world}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
