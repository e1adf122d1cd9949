"""Benchmark: tau against training tokens for DSpark, DFlash and Eagle3 on the built-in SmolLM2-135M target.

The three drafters train on the same data (one shared hidden-state cache, grown with ``data.samples_per_prompt``
sampled answers per demo prompt at T=1), with the same micro batch and the same schedule shape: one warmup +
cosine schedule that spans the largest budget, paused at each smaller budget (``train(stop_after_steps=...)``)
and resumed exactly from that checkpoint for the next. Each budget is evaluated from its checkpoint's weights with
real speculative decoding (batched) at T=0 and T=1 on gsm8k, humaneval and mt-bench prompts. An untrained DSpark
drafter (the initialisation every DSpark run starts from) is the baseline measured in the same run.

``--lever NAME:KEY=VALUE[,KEY=VALUE]`` also trains DSpark alone with those overrides on the largest budget (same
data and schedule; ``--lever-tokens`` picks a smaller budget) and evaluates it the same way: one row per lever.

    python benchmarks/learning_curve.py --budgets 22k,66k,130k [--lever lr6e-3:train.lr=6e-3]

Writes JSON (default benchmarks/results/learning_curve.json) after every evaluation and a PNG of mean tau against
training tokens (one line per algorithm, one panel per temperature) beside it. Rerunning with the same
``--run-root`` and ``--out`` skips what finished (data, cache, evaluated budgets, levers) and resumes training from
the newest checkpoint. Cost is recorded as training tokens and steps and as this process's CPU seconds
(``resource.getrusage``), not wall time: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = {"dspark": "smollm2_dspark", "dflash": "smollm2_dflash", "eagle3": "smollm2_eagle3"}
DATASETS = ["gsm8k", "humaneval", "mt-bench"]
BASELINE = "dspark (untrained)"


def parse_tokens(text: str) -> int:
    """``"22k"`` -> 22000, ``"1.5m"`` -> 1500000, ``"900"`` -> 900; a clear ValueError otherwise."""
    raw = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(raw[-1:], 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"token budget {text!r} is not a number like 22000, 22k or 1.5m") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"token budget {text!r} must be a positive number of tokens")
    return int(round(value * scale))


def plan_budgets(budgets: list[int], tokens_per_step: float) -> list[dict]:
    """Each budget as optimizer steps (at least one), ascending. Two budgets that round to the same step count are
    refused, since they would be the same checkpoint."""
    if tokens_per_step <= 0:
        raise ValueError(f"tokens per step must be positive, got {tokens_per_step}")
    plan = [{"budget_tokens": b, "steps": max(1, round(b / tokens_per_step))} for b in sorted(set(budgets))]
    for earlier, later in zip(plan, plan[1:]):
        if earlier["steps"] == later["steps"]:
            raise ValueError(f"budgets {earlier['budget_tokens']} and {later['budget_tokens']} tokens are both "
                             f"{later['steps']} steps at {tokens_per_step:.0f} tokens per step: drop one")
    for row in plan:
        row["training_tokens"] = round(row["steps"] * tokens_per_step)
    return plan


def pending(results: dict, name: str, plan: list[dict]) -> list[dict]:
    """The budgets of ``plan`` that ``name`` has no evaluation for yet (``results["runs"][name][str(steps)]``)."""
    done = results.get("runs", {}).get(name, {})
    return [row for row in plan if str(row["steps"]) not in done]


def check_schedule(results: dict, schedule_steps: int, tokens_per_step: float) -> None:
    """Refuse to resume into results measured under another schedule (the LR schedule spans the largest budget, so
    a different one would silently change every curve point trained after the resume)."""
    saved = results.get("plan")
    if saved and (saved["schedule_steps"] != schedule_steps or round(saved["tokens_per_step"]) !=
                  round(tokens_per_step)):
        raise ValueError(f"the results were measured with a {saved['schedule_steps']}-step schedule at "
                         f"{saved['tokens_per_step']:.0f} tokens per step, this run plans {schedule_steps} steps at "
                         f"{tokens_per_step:.0f}: pass the same largest budget (--schedule-tokens) or use another "
                         f"--run-root and --out")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _finite(value):
    """``value`` with every NaN (an acceptance slot no round reached) as None, so the file is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2) + "\n")
    os.replace(tmp, path)


def _config(recipe: str, run_dir: Path, schedule_steps: int, threads: int, extra: list[str]):
    from dspark.config import load_config

    # Epochs high enough that max_steps is the binding budget; one checkpoint is all a resume needs.
    return load_config(recipe, [f"run_dir={run_dir}", f"train.max_steps={schedule_steps}", "train.num_epochs=100000",
                                "train.resume=true", "train.keep_last=1", f"train.num_threads={threads}", *extra])


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())


def corpus_stats(cache_dir: Path) -> dict:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    samples = sum(shard["num_samples"] for shard in manifest["shards"])
    return {"samples": samples, "tokens": manifest["num_tokens"], "tokens_per_sample": manifest["num_tokens"] / samples}


def checkpoint_drafter(cfg, target, step: int):
    """The drafter as it was after ``step`` optimizer steps: the module weights of that DeepSpeed checkpoint."""
    import torch

    from dspark.drafters import build_drafter
    from dspark.paths import RunPaths

    tag_dir = RunPaths.of(cfg).checkpoints / f"step{step}"
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise ValueError(f"no DeepSpeed model states in {tag_dir}: the checkpoint of step {step} is missing")
    drafter = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                            target.lm_head_weight)
    state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    drafter.load_state_dict(state, strict=True)
    return drafter.eval()


def train_to(cfg, step: int) -> dict:
    """Train (resuming from the newest checkpoint) until ``step``; the loss of the steps run here and CPU cost."""
    from dspark.paths import RunPaths
    from dspark.train.checkpoint import latest_complete
    from dspark.train.trainer import train

    paths = RunPaths.of(cfg)
    found = latest_complete(paths.checkpoints)
    start = json.loads((found[0] / "dspark_complete.json").read_text())["step"] if found else 0
    if start > step:
        raise ValueError(f"{paths.checkpoints} is already at step {start}, past this budget's {step}: budgets are "
                         f"trained in ascending order; use another --run-root to measure a smaller one")
    cpu = cpu_seconds()
    if start < step:
        train(cfg, progress=False, stop_after_steps=step)
    losses = []
    metrics = paths.tensorboard / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "loss/total" in row and row["step"] <= step:
                losses.append((row["step"], row["loss/total"]))
    last = dict(losses)  # a resumed run may log a step twice; the latest line wins
    window = [last[s] for s in sorted(last) if s > step - max(10, step // 10)]
    # CPU seconds of the steps trained by this call (since the previous budget); None when an earlier invocation
    # already trained them (an interrupted run resumed), whose CPU time this process cannot see.
    return {"steps": step, "loss_last": last.get(step), "loss_mean_last_10pct": sum(window) / len(window)
            if window else None, "train_cpu_s": round(cpu_seconds() - cpu, 1) if start < step else None}


def evaluate_drafter(target, drafter, prompt_sets: dict, args, seed: int) -> dict:
    """Speculative decoding of every prompt set at every temperature: tau and acceptance by position."""
    from dspark.eval.specdec import evaluate

    stop_ids = [i for i in [target.tokenizer.eos_token_id] if i is not None]
    cpu, out = cpu_seconds(), {"tau": {}, "acceptance_K": {}, "survival_K": {}, "generated_tokens": {}, "rounds": {}}
    for dataset, token_ids in prompt_sets.items():
        for temperature in args.temperatures:
            report = evaluate(target, drafter, token_ids, max_new_tokens=args.tokens, temperature=temperature,
                              seed=seed, stop_ids=stop_ids, batch_size=args.batch_size)
            key = f"{dataset}/T{temperature:g}"
            out["tau"][key] = round(report.tau, 4)
            out["acceptance_K"][key] = report.acceptance_K
            out["survival_K"][key] = report.survival_K
            out["generated_tokens"][key] = report.generated_tokens
            out["rounds"][key] = report.num_rounds
            print(f"  {key:<14} tau {report.tau:.3f}", flush=True)
    for temperature in args.temperatures:
        taus = [out["tau"][f"{d}/T{temperature:g}"] for d in prompt_sets]
        out[f"mean_tau_T{temperature:g}"] = round(sum(taus) / len(taus), 4)
    out["eval_cpu_s"] = round(cpu_seconds() - cpu, 1)
    return out


def plot_curve(results: dict, path: Path) -> None:
    """Mean tau (over the datasets) against training tokens, one line per algorithm, one panel per temperature."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    temperatures = results["eval"]["temperatures"]
    fig = Figure(figsize=(5.0 * len(temperatures), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    baseline = results.get("baseline")
    for i, temperature in enumerate(temperatures):
        ax = fig.add_subplot(1, len(temperatures), i + 1)
        key = f"mean_tau_T{temperature:g}"
        for name, runs in results.get("runs", {}).items():
            points = sorted((r["training_tokens"], r[key]) for r in runs.values())
            if baseline:
                points.insert(0, (0, baseline[key]))
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("mean tau (gsm8k, humaneval, mt-bench)")
        ax.set_title(f"T={temperature:g}")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _cpu(row: dict) -> str:
    return "-" if not row.get("train_cpu_s") else f"{row['train_cpu_s']:.0f}"


def markdown_table(results: dict) -> str:
    """BENCHMARKS.md's tables from the results: mean tau (over the datasets) per algorithm and budget at each
    temperature with the loss, then the per-dataset tau, then the lever rows."""
    temps = results["eval"]["temperatures"]
    heads = [f"tau T={t:g}" for t in temps]
    lines = ["| drafter | training tokens | steps | " + " | ".join(heads) + " | loss (tail) | train CPU s (segment) |",
             "|---|---:|---:|" + "---:|" * len(temps) + "---:|---:|"]
    baseline = results.get("baseline")
    if baseline:
        lines.append(f"| {BASELINE} | 0 | 0 | " + " | ".join(f"{baseline[f'mean_tau_T{t:g}']:.3f}" for t in temps)
                     + " | | |")
    for name, runs in results.get("runs", {}).items():
        for r in sorted(runs.values(), key=lambda r: r["steps"]):
            lines.append(f"| {name} | {r['training_tokens']} | {r['steps']} | "
                         + " | ".join(f"{r[f'mean_tau_T{t:g}']:.3f}" for t in temps)
                         + f" | {r['loss_mean_last_10pct']:.3f} | {_cpu(r)} |")
    keys = [f"{d}/T{t:g}" for d in results["eval"]["datasets"] for t in temps]
    lines += ["", "| drafter | training tokens | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    rows = [(BASELINE, baseline)] if baseline else []
    rows += [(n, r) for n, runs in results.get("runs", {}).items() for r in sorted(runs.values(),
                                                                                   key=lambda r: r["steps"])]
    for name, r in rows:
        lines.append(f"| {name} | {r['training_tokens']} | " + " | ".join(f"{r['tau'][k]:.3f}" for k in keys) + " |")
    if results.get("levers"):
        lines += ["", "| lever (DSpark) | training tokens | " + " | ".join(heads) + " | train CPU s |",
                  "|---|---:|" + "---:|" * len(temps) + "---:|"]
        for name, r in results["levers"].items():
            lines.append(f"| {name}: `{' '.join(r['overrides'])}` | {r['training_tokens']} | "
                         + " | ".join(f"{r[f'mean_tau_T{t:g}']:.3f}" for t in temps) + f" | {_cpu(r)} |")
    return "\n".join(lines)


def _parse_lever(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    items = [o for o in overrides.split(",") if o]
    if not sep or not name or not items or any("=" not in o for o in items):
        raise ValueError(f"--lever {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE], e.g. lr6e-3:train.lr=6e-3")
    return name, items


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="22k,66k,130k", help="training-token budgets, comma separated")
    parser.add_argument("--schedule-tokens", default="", help="tokens the LR schedule spans (default: largest budget)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--data-dir", default=os.environ.get("DSPARK_DATA_DIR", str(REPO.parent / "shared" /
                                                                                      "eval_datasets")))
    parser.add_argument("--prompts", type=int, default=20, help="prompts per dataset")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--batch-size", type=int, default=20, help="prompts decoded together (results do not change)")
    parser.add_argument("--samples-per-prompt", type=int, default=3, help="T=1 answers per demo prompt (corpus)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--run-root", default="runs/learning_curve")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra overrides, all runs")
    parser.add_argument("--lever", dest="levers", action="append", default=[], help="NAME:KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--lever-tokens", default="", help="budget the levers train to (default: largest budget)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the untrained DSpark baseline")
    parser.add_argument("--out", default="benchmarks/results/learning_curve.json")
    parser.add_argument("--table", action="store_true", help="print the markdown tables of --out and exit")
    args = parser.parse_args()
    try:
        args.budgets = [parse_tokens(b) for b in args.budgets.split(",") if b.strip()]
        args.levers = [_parse_lever(text) for text in args.levers]
    except ValueError as exc:
        parser.error(str(exc))
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    args.datasets = [d for d in args.datasets.split(",") if d]
    unknown = sorted(set(args.algorithms) - set(ALGORITHMS))
    if unknown:
        parser.error(f"unknown algorithms {unknown}; expected some of {sorted(ALGORITHMS)}")
    if not args.budgets:
        parser.error("--budgets is empty")
    return args


def _plan(args, results: dict, corpus: dict, train_cfg) -> tuple[list[dict], int, float]:
    """Budgets as steps, the schedule length, tokens per step; refuses resuming under another schedule."""
    tokens_per_step = corpus["tokens_per_sample"] * train_cfg.micro_batch_size * train_cfg.grad_accum_steps
    plan = plan_budgets(args.budgets, tokens_per_step)
    schedule_steps = plan[-1]["steps"]
    if args.schedule_tokens:
        schedule_steps = plan_budgets([parse_tokens(args.schedule_tokens)], tokens_per_step)[0]["steps"]
    if schedule_steps < plan[-1]["steps"]:
        raise ValueError(f"--schedule-tokens spans {schedule_steps} steps, less than the largest budget's "
                         f"{plan[-1]['steps']}")
    check_schedule(results, schedule_steps, tokens_per_step)
    return plan, schedule_steps, tokens_per_step


def _run_budgets(name: str, cfg, rows: list[tuple[str, dict]], store: dict, shared, target, prompt_sets: dict, args,
                 save, extra: dict | None = None) -> None:
    """Train ``cfg``'s drafter through the budgets of ``rows`` (``(key, plan row)``, ascending), evaluating each
    budget's checkpoint into ``store[key]`` (with ``extra``); ``save()`` writes it before the next budget starts."""
    from dspark.paths import RunPaths

    paths = RunPaths.of(cfg)
    _link(shared.train_data, paths.train_data)
    _link(shared.cache, paths.cache)
    for key, row in rows:
        print(f"{name}: {row['budget_tokens']} tokens = {row['steps']} steps", flush=True)
        entry = {**(extra or {}), **row, **train_to(cfg, row["steps"])}
        entry.update(evaluate_drafter(target, checkpoint_drafter(cfg, target, row["steps"]), prompt_sets, args,
                                      cfg.eval.seed))
        store[key] = entry
        save()


def main() -> None:
    args = _parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    torch.set_num_threads(args.threads)
    from dspark import stages
    from dspark.data.benchmarks import load_benchmark
    from dspark.data.chat import prompt_ids
    from dspark.drafters import build_drafter
    from dspark.paths import RunPaths
    from dspark.targets import load_target

    texts = {d: load_benchmark(d, args.data_dir, args.prompts) for d in args.datasets}  # fail fast if missing
    root, out_path = Path(args.run_root), Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    overrides = [f"data.samples_per_prompt={args.samples_per_prompt}", "data.regen_temperature=1.0", *args.overrides]

    cpu = cpu_seconds()
    shared_cfg = _config(ALGORITHMS["dspark"], root / "shared", 1, args.threads, overrides)
    shared = RunPaths(root / "shared")
    target = load_target(shared_cfg.target)
    stages.prepare(shared_cfg, target=target, progress=False)  # both resume, and do nothing once complete
    if not (shared.cache / "manifest.json").is_file():
        stages.build_cache(shared_cfg, target=target, progress=False)
    corpus = corpus_stats(shared.cache)
    plan, schedule_steps, tokens_per_step = _plan(args, results, corpus, shared_cfg.train)
    results.setdefault("cpu_s", {}).setdefault("data_and_cache", round(cpu_seconds() - cpu, 1))
    results.update({
        "target": "SmolLM2-135M-Instruct (builtin:smollm2)",
        "corpus": {**corpus, "samples_per_prompt": args.samples_per_prompt, "regen_temperature": 1.0,
                   "prompts": "builtin (the demo's)"},
        "plan": {"tokens_per_step": tokens_per_step, "schedule_steps": schedule_steps,
                 "micro_batch_size": shared_cfg.train.micro_batch_size, "budgets": plan,
                 "note": "training tokens = optimizer steps x micro batch x mean tokens per cached sample; one "
                         "warmup+cosine schedule over schedule_steps, paused at each budget"},
        "eval": {"datasets": args.datasets, "prompts_per_dataset": args.prompts, "new_tokens": args.tokens,
                 "temperatures": args.temperatures, "batch_size": args.batch_size},
        "overrides": overrides, "torch_threads": torch.get_num_threads(),
    })
    prompt_sets = {d: [prompt_ids(target.tokenizer, p) for p in ps] for d, ps in texts.items()}

    def save() -> None:
        _write_json(out_path, results)
        if results.get("runs"):
            plot_curve(results, out_path.with_name(f"{out_path.stem}.png"))

    # Budget by budget (every algorithm at one budget before any goes further), so that a run stopped early still
    # compares the three on the budgets it reached; then the baseline, then the levers.
    configs = {a: _config(ALGORITHMS[a], root / a, schedule_steps, args.threads, overrides) for a in args.algorithms}
    for row in plan:
        for algorithm, cfg in configs.items():
            if pending(results, algorithm, [row]):
                store = results.setdefault("runs", {}).setdefault(algorithm, {})
                _run_budgets(algorithm, cfg, [(str(row["steps"]), row)], store, shared, target, prompt_sets, args,
                             save)
    if not args.no_baseline and "baseline" not in results:
        print("baseline: untrained DSpark", flush=True)
        torch.manual_seed(shared_cfg.train.seed)  # the initialisation every DSpark run starts from
        drafter = build_drafter(shared_cfg.drafter, target.config, shared_cfg.target.layer_ids, target.embed_weight,
                                target.lm_head_weight).eval()
        results["baseline"] = {"name": BASELINE, "training_tokens": 0,
                               **evaluate_drafter(target, drafter, prompt_sets, args, shared_cfg.eval.seed)}
        save()
    lever_row = plan_budgets([parse_tokens(args.lever_tokens)], tokens_per_step)[0] if args.lever_tokens else plan[-1]
    for name, lever_overrides in args.levers:
        if name in results.get("levers", {}):
            continue
        cfg = _config(ALGORITHMS["dspark"], root / "levers" / name, schedule_steps, args.threads,
                      overrides + lever_overrides)
        _run_budgets(f"lever {name} ({' '.join(lever_overrides)}, DSpark)", cfg, [(name, lever_row)],
                     results.setdefault("levers", {}), shared, target, prompt_sets, args, save,
                     extra={"overrides": lever_overrides})
    results["cpu_s"]["last_invocation_total"] = round(cpu_seconds() - cpu, 1)
    save()
    print(json.dumps({name: {r["training_tokens"]: [r[f"mean_tau_T{t:g}"] for t in args.temperatures]
                             for r in runs.values()} for name, runs in results.get("runs", {}).items()}, indent=1))


if __name__ == "__main__":
    main()
