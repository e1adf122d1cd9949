"""The ``dspark`` command line. Heavy imports (torch, transformers, deepspeed) happen inside commands."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

DEFAULT_RECIPE = "smollm2_dspark"


def _friendly_errors(fn):
    """User mistakes become a one-line error (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    return wrapper


def _config_options(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                      help="Override a config field, e.g. --set train.lr=3e-4 (repeatable).")(fn)
    fn = click.option("--config", "-c", "recipe", default=DEFAULT_RECIPE, show_default=True,
                      help="Recipe: a .yaml/.py file or the name of a shipped recipe (dspark recipes).")(fn)
    return fn


def _load(recipe: str, overrides) -> "object":
    from dspark.config import load_config

    return load_config(recipe, overrides)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dspark")
def main():
    """Train speculative-decoding drafters for large frozen target LLMs.

    \b
    Quick start (built-in SmolLM2-135M target, CPU, < 15 minutes):
      dspark demo
    Stage by stage:
      dspark prepare -c smollm2_dspark && dspark cache build -c smollm2_dspark
      dspark train -c smollm2_dspark && dspark eval -c smollm2_dspark
      dspark export runs/smollm2_dspark/drafter out/ --format deepspec
    """


@main.command()
def recipes():
    """List the shipped recipes.

    \b
    Example:
      dspark recipes
    """
    from dspark.config import list_recipes

    for name in list_recipes():
        click.echo(name)


@main.command()
@_config_options
@_friendly_errors
def prepare(recipe, overrides):
    """Regenerate answers to the prompts with the target and hold out evaluation prompts.

    \b
    Example:
      dspark prepare -c smollm2_dspark --set data.max_prompts=32
    """
    cfg = _load(recipe, overrides)
    _quiet_libraries()
    from dspark import pipeline

    out = pipeline.prepare(cfg)
    for name, path in out.items():
        click.echo(f"{name}: {path}")


@main.group()
def cache():
    """Hidden-state caches: build, inspect, verify."""


@cache.command("build")
@_config_options
@_friendly_errors
def cache_build(recipe, overrides):
    """Capture the target's hidden states of the prepared conversations into a zstd cache.

    \b
    Example:
      dspark cache build -c smollm2_dspark --set cache.zstd_level=6
    """
    cfg = _load(recipe, overrides)
    _quiet_libraries()
    from dspark import pipeline

    click.echo(f"cache: {pipeline.build_cache(cfg)}")


@cache.command("inspect")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_friendly_errors
def cache_inspect(cache_dir, as_json):
    """Summarise a cache: target, layer ids, codec, samples, tokens, bytes per token.

    \b
    Example:
      dspark cache inspect runs/smollm2_dspark/cache --json
    """
    from dspark.cache.build import inspect_cache

    info = inspect_cache(Path(cache_dir))
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            click.echo(f"{key:>22}: {value}")


@cache.command("verify")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@_friendly_errors
def cache_verify(cache_dir):
    """Recompute every shard checksum; exit non-zero naming the first corrupt shard and sample.

    \b
    Example:
      dspark cache verify runs/smollm2_dspark/cache
    """
    from dspark.cache import CacheReader

    reader = CacheReader(Path(cache_dir))
    click.echo(f"ok: {reader.verify()} samples in {len(reader.manifest['shards'])} shards verified")


@main.command()
@_config_options
@_friendly_errors
def train(recipe, overrides):
    """Train the drafter on the cache inside a DeepSpeed engine (one process).

    For several processes or nodes use the launcher:
    deepspeed --num_gpus 2 launcher/train.py --config R

    \b
    Example:
      dspark train -c smollm2_dspark --set train.max_steps=50
    """
    cfg = _load(recipe, overrides)
    _quiet_libraries()
    from dspark import pipeline

    result = pipeline.train(cfg)
    click.echo(f"trained {result.steps} steps, final loss {result.final_loss:.4f}, "
               f"{result.tokens_per_s:.0f} block tokens/s")
    click.echo(f"drafter: {result.drafter_dir}\ncheckpoints: {result.checkpoint_dir}\n"
               f"tensorboard: {result.tensorboard_dir}")


@main.command("eval")
@_config_options
@click.option("--drafter", "drafter_dir", default=None, type=click.Path(file_okay=False),
              help="Drafter directory (default: <run_dir>/drafter).")
@click.option("--dataset", "datasets", multiple=True, metavar="NAME[,NAME...]",
              help="Evaluate on fetched benchmarks instead of the held-out prompts (repeatable or "
                   "comma-separated; see `dspark data fetch-benchmarks`).")
@_friendly_errors
def eval_cmd(recipe, overrides, drafter_dir, datasets):
    """Speculative decoding of the trained drafter (and an untrained one) against the target.

    Reports tau (accepted length incl. the bonus token) and per-position conditional acceptance.

    \b
    Example:
      dspark eval -c smollm2_dspark --set eval.num_prompts=8
      dspark eval -c smollm2_dspark --dataset gsm8k --dataset humaneval,mt-bench
    """
    cfg = _load(recipe, overrides)
    _quiet_libraries()
    from dspark import pipeline

    pipeline.evaluate(cfg, drafter_dir=Path(drafter_dir) if drafter_dir else None,
                      datasets=list(datasets) if datasets else None)
    click.echo(f"report: {Path(cfg.run_dir) / 'eval' / 'report.json'}")


@main.group()
def data():
    """Prompt data: fetch public benchmarks for `dspark eval --dataset`."""


@data.command("fetch-benchmarks")
@click.argument("names", nargs=-1)
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Where to write <name>.jsonl (default: $DSPARK_DATA_DIR or ~/.cache/dspark/benchmarks).")
@click.option("--force", is_flag=True, help="Download again even if a benchmark file exists.")
@_friendly_errors
def data_fetch_benchmarks(names, data_dir, force):
    """Download benchmarks from the Hugging Face hub as {"turns": [...]} jsonl (default: all of them).

    Known: gsm8k, math500, aime25, humaneval, mbpp, livecodebench, mt-bench, alpaca, arena-hard-v2.

    \b
    Example:
      dspark data fetch-benchmarks gsm8k humaneval --data-dir data/benchmarks
      dspark eval -c smollm2_dspark --dataset gsm8k --set eval.data_dir=data/benchmarks
    """
    from dspark.data.benchmarks import fetch_benchmarks

    for name, path in fetch_benchmarks(list(names) or None, data_dir, force=force).items():
        click.echo(f"{name}: {path}")


@main.command()
@click.argument("drafter_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", default="deepspec", show_default=True, type=click.Choice(["deepspec"]),
              help="Attach-on layout to write.")
@_friendly_errors
def export(drafter_dir, out_dir, fmt):
    """Export a trained drafter as a Hugging Face attach-on checkpoint.

    \b
    Example:
      dspark export runs/smollm2_dspark/drafter exported/ --format deepspec
    """
    from dspark import pipeline

    click.echo(f"exported: {pipeline.export(Path(drafter_dir), Path(out_dir), fmt)}")


@main.command()
@_config_options
@_friendly_errors
def demo(recipe, overrides):
    """Run every stage end to end on the built-in SmolLM2-135M target (CPU, < 15 minutes).

    \b
    Example:
      dspark demo
      dspark demo -c tiny_llama_dspark          # a tiny random target, ~1 minute
    """
    cfg = _load(recipe, overrides)
    _quiet_libraries()
    from dspark.demo import run_demo

    run_demo(cfg)


if __name__ == "__main__":
    sys.exit(main())
