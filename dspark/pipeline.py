"""The stages of a run, each callable on its own (CLI) or chained (``dspark demo``).

    prompts --prepare--> <run>/data/train.jsonl --cache build--> <run>/cache --train--> <run>/drafter
            --eval--> <run>/eval --export--> <run>/export/<format>

Every stage takes the resolved ``RunConfig``; stages that need the target accept an already loaded one so
the demo loads it once.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dspark.config import RunConfig


@dataclass
class RunPaths:
    root: Path

    @property
    def train_data(self) -> Path:
        return self.root / "data" / "train.jsonl"

    @property
    def eval_prompts(self) -> Path:
        return self.root / "data" / "eval_prompts.jsonl"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def drafter(self) -> Path:
        return self.root / "drafter"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def export(self, fmt: str) -> Path:
        return self.root / "export" / fmt


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str):
        times = self

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                times.seconds[name] = time.perf_counter() - self.start

        return _Timer()


def prepare(cfg: RunConfig, target=None, progress: bool = True) -> dict[str, Path]:
    """Regenerate answers to the training prompts with the target; hold out evaluation prompts."""
    from dspark.data.prompts import load_prompts, split_prompts
    from dspark.data.regenerate import regenerate, write_jsonl
    from dspark.targets import load_target

    paths = RunPaths(Path(cfg.run_dir))
    prompts = load_prompts(cfg.data.prompts, cfg.data.max_prompts)
    train_prompts, eval_prompts = split_prompts(prompts, cfg.data.num_eval_prompts, cfg.data.seed)
    target = target or load_target(cfg.target)
    conversations = regenerate(
        target, train_prompts, max_new_tokens=cfg.data.max_new_tokens, temperature=cfg.data.regen_temperature,
        batch_size=cfg.data.regen_batch_size, seed=cfg.data.seed, max_seq_len=cfg.data.max_seq_len,
        progress=progress,
    )
    write_jsonl(paths.train_data, conversations)
    write_jsonl(paths.eval_prompts, [{"turns": [p]} for p in eval_prompts])
    cfg.save(paths.root / "config.json")
    return {"train_data": paths.train_data, "eval_prompts": paths.eval_prompts}


def build_cache(cfg: RunConfig, target=None, progress: bool = True) -> Path:
    """Capture the target's hidden states for the prepared conversations into the zstd cache."""
    from dspark.cache.build import build_cache as _build
    from dspark.data.regenerate import read_conversations
    from dspark.targets import load_target

    paths = RunPaths(Path(cfg.run_dir))
    if not paths.train_data.is_file():
        raise ValueError(f"no prepared data at {paths.train_data}: run `dspark prepare` with this config first")
    conversations = read_conversations(paths.train_data)
    target = target or load_target(cfg.target)
    return _build(target, conversations, paths.cache, cfg.cache, progress=progress)


def train(cfg: RunConfig, progress: bool = True):
    """Train the drafter on the cache in a DeepSpeed engine (this process; use launcher/train.py for many)."""
    from dspark.train.trainer import train as _train

    return _train(cfg, cache_dir=RunPaths(Path(cfg.run_dir)).cache, progress=progress)


def evaluate(cfg: RunConfig, target=None, drafter_dir: Path | None = None, progress: bool = True,
             datasets: list[str] | None = None) -> dict:
    """Speculative decoding on the held-out prompts: the trained drafter next to an untrained one.

    ``datasets`` (default ``cfg.eval.datasets``) names fetched benchmarks (``dspark.data.benchmarks``) to
    evaluate on instead, each capped at ``eval.num_prompts``; their report keys are ``"<dataset>/T<temp>"``
    rather than ``"T<temp>"``.
    """
    import torch

    from dspark.data.benchmarks import load_benchmark, parse_names
    from dspark.data.chat import prompt_ids
    from dspark.data.prompts import load_prompts
    from dspark.drafters import build_drafter, load_drafter
    from dspark.eval.plots import plot_acceptance
    from dspark.eval.specdec import evaluate as run_eval
    from dspark.eval.specdec import format_table
    from dspark.targets import load_target
    from dspark.train.metrics import MetricsLogger

    paths = RunPaths(Path(cfg.run_dir))
    drafter_dir = Path(drafter_dir) if drafter_dir else paths.drafter
    if not (drafter_dir / "config.json").is_file():
        raise ValueError(f"no trained drafter at {drafter_dir}: run `dspark train` with this config first")
    names = parse_names(cfg.eval.datasets if datasets is None else datasets)
    if not names and not paths.eval_prompts.is_file():
        raise ValueError(f"no held-out prompts at {paths.eval_prompts}: run `dspark prepare` first")
    # Prompt sets are read before the target loads so that a missing benchmark fails fast. "" = held out.
    prompt_sets = {name: load_benchmark(name, cfg.eval.data_dir or None, cfg.eval.num_prompts) for name in names}
    if not names:
        prompt_sets[""] = load_prompts(str(paths.eval_prompts), cfg.eval.num_prompts)
    target = target or load_target(cfg.target)
    trained = load_drafter(drafter_dir).eval()
    torch.manual_seed(cfg.train.seed)  # the same initialisation the trained drafter started from
    untrained = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                              target.lm_head_weight).eval()
    stop_ids = sorted({i for i in [target.tokenizer.eos_token_id] if i is not None})

    results: dict[str, dict] = {}
    paths.eval_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(paths.tensorboard)
    for dataset, prompts in prompt_sets.items():
        prompt_token_ids = [prompt_ids(target.tokenizer, p) for p in prompts]
        for temperature in cfg.eval.temperatures:
            reports = {}
            for name, drafter in (("trained", trained), ("untrained", untrained)):
                reports[name] = run_eval(target, drafter, prompt_token_ids, max_new_tokens=cfg.eval.max_new_tokens,
                                         temperature=temperature, seed=cfg.eval.seed, stop_ids=stop_ids,
                                         progress=progress)
            tag = f"T{temperature:g}"
            key, file_tag = (f"{dataset}/{tag}", f"{dataset}_{tag}") if dataset else (tag, tag)
            print(f"\nspeculative decoding on {len(prompts)} {dataset or 'held-out'} prompts, "
                  f"temperature {temperature:g}")
            print(format_table(reports))
            plot_acceptance(reports, paths.eval_dir / f"acceptance_{file_tag}.png")
            results[key] = {name: r.to_dict() for name, r in reports.items()}
            for name, r in reports.items():
                logger.log(0, {f"eval_{file_tag}/{name}/tau": r.tau})
    logger.close()
    (paths.eval_dir / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def export(drafter_dir: Path, out_dir: Path, fmt: str = "deepspec") -> Path:
    """Write the trained drafter as an HF attach-on directory in ``fmt``."""
    from dspark.drafters import load_drafter
    from dspark.export import export_drafter

    if not (Path(drafter_dir) / "config.json").is_file():
        raise ValueError(f"{drafter_dir} holds no trained drafter (config.json missing)")
    drafter = load_drafter(drafter_dir)
    return export_drafter(drafter, out_dir, fmt)
