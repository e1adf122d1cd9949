"""Benchmark: a small-scale analogue of the DSpark paper's Table 1 on SmolLM2-135M-Instruct.

DSpark, DFlash and Eagle3 are trained on the same regenerated data (one shared hidden-state cache) with the same
optimizer-step budget, then evaluated with real speculative decoding on capped gsm8k, humaneval and mt-bench
prompts at T=1 and T=0. An untrained DSpark drafter (the same initialisation) is the baseline measured in the
same run. Writes JSON (default benchmarks/results/table1.json) and beside it one acceptance-by-position PNG per
(dataset, temperature) with a line per drafter (``<json stem>_acceptance_<dataset>_T<t>.png``).

    python benchmarks/table1.py --data-dir ../shared/eval_datasets [--steps 200] [--prompts 8] [--tokens 48]

Benchmark prompts are read from ``--data-dir`` (rows ``{"turns": [...]}``; ``dspark data fetch-benchmarks``
writes them where the hub is reachable). Stages that already finished (data, cache, a trained drafter) are
reused when the script is rerun with the same ``--run-root``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ALGORITHMS = {"dspark": "smollm2_dspark", "dflash": "smollm2_dflash", "eagle3": "smollm2_eagle3"}
DATASETS = ["gsm8k", "humaneval", "mt-bench"]


def _config(recipe: str, run_dir: Path, steps: int, extra: list[str]):
    from dspark.config import load_config

    # Epochs high enough that max_steps is the binding budget for every algorithm.
    return load_config(recipe, [f"run_dir={run_dir}", f"train.max_steps={steps}", "train.num_epochs=100", *extra])


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--data-dir", default=os.environ.get("DSPARK_DATA_DIR"), help="benchmark jsonl folder")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per drafter (same for all)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per dataset")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per prompt")
    parser.add_argument("--temperatures", default="1,0")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (results do not change)")
    parser.add_argument("--run-root", default="runs/table1")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra overrides, all runs")
    parser.add_argument("--no-baseline", action="store_true", help="skip the untrained DSpark baseline")
    parser.add_argument("--out", default="benchmarks/results/table1.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from dspark import stages
    from dspark.data.benchmarks import load_benchmark
    from dspark.data.chat import prompt_ids
    from dspark.drafters import build_drafter
    from dspark.eval.plots import plot_acceptance
    from dspark.eval.specdec import evaluate
    from dspark.export import load_drafter
    from dspark.paths import RunPaths
    from dspark.targets import load_target

    algorithms = [a for a in args.algorithms.split(",") if a]
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        raise SystemExit(f"unknown algorithms {unknown}; expected some of {sorted(ALGORITHMS)}")
    datasets = [d for d in args.datasets.split(",") if d]
    temperatures = [float(t) for t in args.temperatures.split(",")]
    root = Path(args.run_root)
    prompt_sets = {d: load_benchmark(d, args.data_dir, args.prompts) for d in datasets}  # fail fast if missing

    seconds: dict[str, float] = {}
    shared_cfg = _config(ALGORITHMS["dspark"], root / "shared", args.steps, args.overrides)
    shared = RunPaths(root / "shared")
    target = load_target(shared_cfg.target)
    if not shared.train_data.is_file():
        start = time.perf_counter()
        stages.prepare(shared_cfg, target=target)
        seconds["prepare"] = time.perf_counter() - start
    if not (shared.cache / "manifest.json").is_file():
        start = time.perf_counter()
        stages.build_cache(shared_cfg, target=target)
        seconds["cache build"] = time.perf_counter() - start

    drafters = {}
    train_info = {}
    for algorithm in algorithms:
        cfg = _config(ALGORITHMS[algorithm], root / algorithm, args.steps, args.overrides)
        paths = RunPaths(root / algorithm)
        _link(shared.train_data, paths.train_data)
        _link(shared.cache, paths.cache)
        if not (paths.drafter / "config.json").is_file():
            start = time.perf_counter()
            result = stages.train(cfg)
            seconds[f"train {algorithm}"] = time.perf_counter() - start
            train_info[algorithm] = {"steps": result.steps, "final_loss": result.final_loss,
                                     "block_tokens_per_s": result.tokens_per_s}
        drafters[algorithm] = load_drafter(paths.drafter).eval()
        if algorithm == "dspark" and not args.no_baseline:
            torch.manual_seed(cfg.train.seed)  # the initialisation the trained DSpark drafter started from
            drafters["dspark (untrained)"] = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids,
                                                           target.embed_weight, target.lm_head_weight).eval()

    stop_ids = [i for i in [target.tokenizer.eos_token_id] if i is not None]
    results: dict[str, dict] = {}
    out_path = Path(args.out)
    for dataset, prompts in prompt_sets.items():
        token_ids = [prompt_ids(target.tokenizer, p) for p in prompts]
        for temperature in temperatures:
            reports = {}
            for name, drafter in drafters.items():
                start = time.perf_counter()
                reports[name] = evaluate(target, drafter, token_ids, max_new_tokens=args.tokens,
                                         temperature=temperature, seed=shared_cfg.eval.seed, stop_ids=stop_ids,
                                         batch_size=args.batch_size)
                seconds[f"eval {name} {dataset} T{temperature:g}"] = time.perf_counter() - start
                print(f"{dataset:<10} T={temperature:g} {name:<20} tau {reports[name].tau:.3f}", flush=True)
            key = f"{dataset}/T{temperature:g}"
            results[key] = {name: r.to_dict() for name, r in reports.items()}
            plot_acceptance(reports, out_path.with_name(f"{out_path.stem}_acceptance_{dataset}_T{temperature:g}.png"))

    table = {key: {name: round(r["tau"], 3) for name, r in reps.items()} for key, reps in results.items()}
    mean_tau = {name: round(sum(t[name] for t in table.values()) / len(table), 3) for name in drafters}
    out = {"target": "SmolLM2-135M-Instruct (builtin:smollm2)", "steps_per_drafter": args.steps,
           "prompts_per_dataset": args.prompts, "new_tokens": args.tokens, "tau": table, "mean_tau": mean_tau,
           "ordering_by_mean_tau": sorted(drafters, key=lambda n: -mean_tau[n]), "train": train_info,
           "reports": results, "seconds": {k: round(v, 1) for k, v in seconds.items()},
           "overrides": args.overrides, "torch_threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"tau": table, "mean_tau": mean_tau}, indent=2))


if __name__ == "__main__":
    main()
