"""``dspark demo``: every stage end to end, timing each and printing where every artifact is."""

from __future__ import annotations

import json
from pathlib import Path

from dspark import stages
from dspark.config import RunConfig
from dspark.paths import RunPaths


def run_demo(cfg: RunConfig) -> dict:
    """prepare -> cache build -> train -> eval -> export, with the target loaded once."""
    from dspark.distributed import local_device
    from dspark.export import detect_format
    from dspark.targets import load_target

    paths = RunPaths(Path(cfg.run_dir))
    times = stages.StageTimes()
    with times.timed("load target"):
        target = load_target(cfg.target, device=local_device())
    print(f"target: {target.name} ({sum(p.numel() for p in target.model.parameters()) / 1e6:.0f}M parameters), "
          f"feature layers {cfg.target.layer_ids}")
    with times.timed("prepare (regenerate answers)"):
        stages.prepare(cfg, target=target)
    with times.timed("cache build"):
        stages.build_cache(cfg, target=target)
    with times.timed("train"):
        result = stages.train(cfg)
    with times.timed("eval"):
        report = stages.evaluate(cfg, target=target)
    with times.timed("export"):
        # The drafter is exported in the layout the trainer wrote it in (dspark.export.NATIVE_FORMATS), or as
        # speculators when SGLang/vLLM's Eagle3 layout cannot hold its feature layers (it takes exactly 3).
        fmt = detect_format(paths.drafter)
        if fmt == "eagle3" and len(cfg.target.layer_ids) != 3:
            fmt = "speculators"
        exported = stages.export(paths.drafter, paths.export(fmt), fmt, overwrite=True)

    summary = {"stage_seconds": {k: round(v, 1) for k, v in times.seconds.items()},
               "train_steps": result.steps, "final_loss": result.final_loss,
               "tau": {tag: {name: r["tau"] for name, r in reps.items()} for tag, reps in report.items()}}
    (paths.root / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nstage wall times:")
    for name, sec in times.seconds.items():
        print(f"  {name:<30} {sec:7.1f} s")
    print("\nartifacts:")
    for name, path in [("resolved config", paths.root / "config.json"), ("conversations", paths.train_data),
                       ("held-out prompts", paths.eval_prompts), ("hidden-state cache", paths.cache),
                       ("checkpoints", result.checkpoint_dir), ("trained drafter", paths.drafter),
                       ("tensorboard", paths.tensorboard), ("eval report", paths.eval_dir / "report.json"),
                       ("acceptance plots", paths.eval_dir), (f"export ({fmt})", exported),
                       ("summary", paths.root / "demo_summary.json")]:
        print(f"  {name:<20} {path}")
    print(f"\nwatch training: tensorboard --logdir {paths.tensorboard}")
    return summary
