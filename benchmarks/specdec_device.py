"""Benchmark and check: speculative decoding of untrained DSpark and Eagle3 drafters on a given device.

For each drafter it checks the two properties the evaluator must keep on any device: greedy speculative decoding
equals the target's own greedy output token for token, and the T=1 report does not depend on how many prompts are
decoded together. It also reports generated tokens/s at batch 1 and at ``--batch``, as a ratio to batch 1
measured in the same run.

    python benchmarks/specdec_device.py [--device cuda] [--target builtin:tiny-llama] [--prompts 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RECIPES = {"dspark": "tiny_llama_dspark", "eagle3": "tiny_llama_eagle3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--target", default="builtin:tiny-llama")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/specdec_device.json")
    args = parser.parse_args()

    import torch

    from dspark.config import load_config
    from dspark.data.chat import prompt_ids
    from dspark.data.prompts import load_prompts
    from dspark.drafters import build_drafter
    from dspark.eval.specdec import evaluate, speculative_generate
    from dspark.targets import load_target

    results = {"device": args.device, "target": args.target, "prompts": args.prompts, "tokens": args.tokens}
    target = None
    for algorithm, recipe in RECIPES.items():
        cfg = load_config(recipe, [f"target.name_or_path={args.target}"])
        target = target or load_target(cfg.target, device=args.device)
        torch.manual_seed(0)
        drafter = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                                target.lm_head_weight).to(args.device).eval()
        prompts = [prompt_ids(target.tokenizer, p) for p in load_prompts("builtin", args.prompts)]
        stop_ids = [target.tokenizer.eos_token_id]
        greedy = target.generate(prompts, max_new_tokens=args.tokens, temperature=0.0, batch_size=1, seed=0)
        spec = [speculative_generate(target, drafter, p, max_new_tokens=args.tokens, temperature=0.0,
                                     generator=torch.Generator(device=args.device).manual_seed(0),
                                     stop_ids=stop_ids).tokens for p in prompts]
        row = {"greedy_equals_target": [g == s for g, s in zip(greedy, spec)]}
        reports = {}
        for batch in (1, args.batch):
            start = time.perf_counter()
            reports[batch] = evaluate(target, drafter, prompts, max_new_tokens=args.tokens, temperature=1.0, seed=0,
                                      stop_ids=stop_ids, batch_size=batch)
            row[f"wall_s_batch{batch}"] = round(time.perf_counter() - start, 2)
            row[f"tokens_per_s_batch{batch}"] = round(reports[batch].tokens_per_s, 1)
        row["t1_report_equal_across_batch"] = (reports[1].tau == reports[args.batch].tau
                                               and reports[1].acceptance_K == reports[args.batch].acceptance_K)
        row["tau_t1"] = round(reports[1].tau, 4)
        row["speedup_batch_vs_1"] = round(row[f"tokens_per_s_batch{args.batch}"] / row["tokens_per_s_batch1"], 2)
        results[algorithm] = row
        print(algorithm, json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
