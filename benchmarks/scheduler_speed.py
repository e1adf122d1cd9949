"""Benchmark: generated tokens/s of the verify policies (full, threshold, scheduler) at batch 1, 4 and 16.

Real speculative decoding of a trained DSpark drafter (``<run>/drafter``, with its ``calibration.json`` when
``dspark calibrate`` wrote one) against the run's target on the run's held-out prompts, through
``dspark.eval.policies.policy_sweep`` (what ``dspark eval`` runs for ``eval.policy_sweep``). The SPS table of this
machine is measured first, in the same run (``tools/profile_sps.py``'s ``measure``, rows x {1, gamma + 1} tokens),
unless ``--sps`` names one. Greedy by default, so every policy decodes exactly the same tokens and only their cost
differs. Every figure is a ratio against ``full`` at the same batch size, measured in the same run; each (batch,
policy) runs ``--repeats`` times, alternating, and keeps its fastest wall time.

    cpuslot python benchmarks/scheduler_speed.py --run-dir runs/smollm2_dspark -c smollm2_dspark \\
        --out benchmarks/results/scheduler_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.eval_speed import reference_decode  # noqa: E402


def _profile(target, gamma: int, batch_sizes: list[int], context_len: int) -> dict[int, dict[int, float]]:
    """This machine's SPS table by rows (``tools/profile_sps.py``'s measurements): {rows: {tokens_per_row: sps}}."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from profile_sps import default_tokens_per_row, measure

    by_rows: dict[int, dict[int, float]] = {}
    for rows in batch_sizes:
        for per_row in default_tokens_per_row(gamma):
            sps = measure(target, rows, per_row, context_len, warmup=1, iters=4, seed=0)
            by_rows.setdefault(rows, {})[per_row] = sps
            print(f"SPS rows {rows:>3} x {per_row} tokens: {sps:8.2f} steps/s", flush=True)
    return by_rows


class _NoCut:
    """``drafter`` without ``stop_drafting`` support: every proposal is drafted to the full block, as before drafting
    stopped at the first slot the scheduler could not verify from (``--compare-cut``)."""

    cuts_drafting = False

    def __init__(self, drafter):
        self._drafter = drafter

    def __getattr__(self, name):
        return getattr(self._drafter, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="A run with data/eval_prompts.jsonl and drafter/.")
    parser.add_argument("--config", "-c", default="smollm2_dspark")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--policies", default="full,threshold,scheduler")
    parser.add_argument("--threshold", type=float, default=0.3, help="eval.confidence_threshold of 'threshold'.")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--context-len", type=int, default=192, help="KV context of the SPS profile.")
    parser.add_argument("--sps", default="", help="An SPS table to use instead of profiling here.")
    parser.add_argument("--compare-cut", action="store_true",
                        help="Also run 'scheduler' with every proposal drafted to the full block (the drafter's "
                             "stop_drafting support hidden): row 'scheduler_no_cut'.")
    parser.add_argument("--no-target", action="store_true",
                        help="Skip plain target decoding (NoDrafts) at each batch size (tokens_per_s_vs_target).")
    parser.add_argument("--reference-dir", default="",
                        help="A checkout of the reference implementation (DeepSpec): also time its own batch-1 loop "
                             "on the same drafter and prompts (tokens_per_s_vs_reference_batch1).")
    parser.add_argument("--out", default="benchmarks/results/scheduler_speed.json")
    args = parser.parse_args()

    import torch

    from dspark.config import load_config
    from dspark.data.chat import prompt_ids
    from dspark.data.prompts import load_prompts
    from dspark.eval.policies import policy_sweep, tokens_digest
    from dspark.eval.scheduler import SPSTable, device_tag
    from dspark.eval.specdec import DecodeStats, NoDrafts, decode_prompts
    from dspark.export import load_drafter
    from dspark.targets import load_target

    run = Path(args.run_dir)
    cfg = load_config(args.config, [f"run_dir={run}"])
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    policies = args.policies.split(",")
    target = load_target(cfg.target)
    drafter = load_drafter(run / "drafter").eval()
    calibrated = (run / "drafter" / "calibration.json").is_file()
    prompts = [prompt_ids(target.tokenizer, p) for p in load_prompts(str(run / "data" / "eval_prompts.jsonl"),
                                                                     args.num_prompts)]
    stop_ids = [target.tokenizer.eos_token_id]
    if args.sps:
        sps, sps_points = SPSTable.load(args.sps), None
    else:
        sps_points = _profile(target, drafter.block_size, batch_sizes, args.context_len)
        sps = SPSTable.per_rows(sps_points, source="profiled in this run (by rows)")

    best: dict[tuple[int, str], dict] = {}
    start = time.perf_counter()
    for _ in range(args.repeats):
        if args.reference_dir:
            wall_s, tokens = reference_decode(target, prompts, stop_ids, reference_dir=args.reference_dir,
                                              drafter_dir=str(run / "drafter"), temperature=args.temperature,
                                              max_new_tokens=args.max_new_tokens)
            if (1, "reference") not in best or wall_s < best[(1, "reference")]["wall_s"]:
                best[(1, "reference")] = {"policy": "reference", "batch_size": 1, "wall_s": wall_s, "tokens": tokens,
                                          "tokens_per_s": sum(map(len, tokens)) / wall_s}
        for batch in batch_sizes:
            if not args.no_target:
                stats = DecodeStats()
                results, wall_s = decode_prompts(target, NoDrafts(target), prompts, max_new_tokens=args.max_new_tokens,
                                                 temperature=args.temperature, seed=0, stop_ids=stop_ids,
                                                 batch_size=batch, stats=stats)
                if (batch, "target") not in best or wall_s < best[(batch, "target")]["wall_s"]:
                    best[(batch, "target")] = {"policy": "target", "batch_size": batch, "wall_s": wall_s,
                                               "tokens": [r.tokens for r in results],
                                               "tokens_per_s": sum(len(r.tokens) for r in results) / wall_s}
            torch.manual_seed(0)
            sweeps = [(drafter, policies, "")]
            if args.compare_cut:  # its "full" run is the same code path as the first sweep's: one more sample
                sweeps.append((_NoCut(drafter), ["full", "scheduler"], "_no_cut"))
            for who, names, suffix in sweeps:
                for row in policy_sweep(target, who, prompts, policies=names, batch_sizes=[batch], sps=sps,
                                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0,
                                        stop_ids=stop_ids, confidence_threshold=args.threshold):
                    if row["policy"] != "full":
                        row["policy"] += suffix
                    key = (batch, row["policy"])
                    if key not in best or row["wall_s"] < best[key]["wall_s"]:
                        best[key] = row
    if args.compare_cut:
        policies = policies + ["scheduler_no_cut"]
    for batch in batch_sizes:  # ratios of the kept (fastest) runs
        full = best[(batch, "full")]
        for policy in policies:
            row = best[(batch, policy)]
            row["tokens_per_s_vs_full"] = round(row["tokens_per_s"] / full["tokens_per_s"], 3)
            row["target_step_s_vs_full"] = round(row["target_step_s"] / full["target_step_s"], 3)
            row["same_tokens_as_full"] = row["tokens_sha1"] == full["tokens_sha1"]
            if (batch, "target") in best:
                row["tokens_per_s_vs_target"] = round(row["tokens_per_s"] / best[(batch, "target")]["tokens_per_s"], 3)
            if (1, "reference") in best:
                row["tokens_per_s_vs_reference_batch1"] = round(
                    row["tokens_per_s"] / best[(1, "reference")]["tokens_per_s"], 3)
    baselines = {}
    for key in [(b, "target") for b in batch_sizes] + [(1, "reference")]:
        if key in best:
            best[key]["tokens_sha1"] = tokens_digest(best[key].pop("tokens"))
            best[key]["wall_s"] = round(best[key]["wall_s"], 3)
            baselines[f"{key[1]}_batch{key[0]}"] = best[key]
    rows = [best[(b, p)] for b in batch_sizes for p in policies]
    for name, base in baselines.items():
        print(f"{name:<16} tok/s {base['tokens_per_s']:7.2f}  tokens {base['tokens_sha1']}", flush=True)
    for r in rows:
        print(f"batch {r['batch_size']:>3} {r['policy']:<10} tau {r['tau']:.3f} prop {r['mean_proposal_len']:.2f} "
              f"tok/call {r['tokens_per_target_call']:6.2f} tok/s {r['tokens_per_s']:7.2f} "
              f"step {1000 * r['target_step_s']:7.1f} ms  x{r['tokens_per_s_vs_full']:.3f} vs full "
              f"(simulated {r['simulated_speedup']}) vs target x{r.get('tokens_per_s_vs_target')} vs reference b1 "
              f"x{r.get('tokens_per_s_vs_reference_batch1')} tokens {r['tokens_sha1']}", flush=True)
    out = {
        "command": "python " + " ".join(sys.argv), "target": cfg.target.name_or_path, "run_dir": str(run),
        "drafter_calibrated": calibrated, "gamma": drafter.block_size, "num_prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "threshold": args.threshold,
        "repeats": args.repeats, "device": device_tag(target.embed_weight.device),
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "sps": sps_points if sps_points is not None else args.sps, "total_s": round(time.perf_counter() - start, 1),
        "rows": rows, "baselines": baselines,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
