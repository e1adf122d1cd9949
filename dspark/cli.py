"""The ``dspark`` command line. Heavy imports (torch, transformers, deepspeed) happen inside commands."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from dspark.config import Codec, choices

# Light: each exporter module is imported only when it is used.
from dspark.export import FORMATS as EXPORT_FORMATS

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

    # Third-party chatter only: dspark's own warnings (a skipped setting, a fallback) must reach the user.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(?!dspark)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(?!dspark)")
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
@click.option("--restart", is_flag=True, help="Discard a partial regeneration made with other settings.")
@click.option("--server", "servers", multiple=True, metavar="URL",
              help="Regenerate through this OpenAI-compatible server (vLLM, SGLang, dspark serve); repeatable. "
                   "Same as data.servers.")
@_friendly_errors
def prepare(recipe, overrides, restart, servers):
    """Regenerate answers to the prompts with the target and hold out evaluation prompts.

    One process; with a target hosted across processes use `deepspeed launcher/prepare.py --config R --set ...`.
    Rows are written in prompt order as they finish; after a crash or kill, rerun the same command to resume.

    \b
    Example:
      dspark prepare -c smollm2_dspark --set data.max_prompts=32
      dspark prepare -c qwen3_8b_dspark --server http://node1:8000 --server http://node2:8000
    """
    cfg = _load(recipe, overrides)
    if servers:
        cfg.data.servers = list(servers)
    _quiet_libraries()
    from dspark import stages

    out = stages.prepare(cfg, restart=restart)
    for name, path in out.items():
        click.echo(f"{name}: {path}")


@main.command()
@_config_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-batch", default=16, show_default=True, type=int, help="Requests batched into one generate.")
@click.option("--fail-first", default=0, type=int, hidden=True, help="Testing: answer the first N requests with 503.")
@_friendly_errors
def serve(recipe, overrides, host, port, max_batch, fail_first):
    """Serve the config's target as an OpenAI-compatible endpoint (/v1/chat/completions, /v1/completions).

    \b
    Example:
      dspark serve -c smollm2_dspark --port 8000 &
      dspark prepare -c smollm2_dspark --server http://127.0.0.1:8000
    """
    cfg = _load(recipe, overrides)
    if max_batch < 1:
        raise click.BadParameter(f"must be >= 1, got {max_batch}", param_hint="--max-batch")
    _quiet_libraries()
    from dspark import distributed as dist_utils
    from dspark.serve import TargetServer
    from dspark.targets import load_target

    target = load_target(cfg.target, device=dist_utils.local_device())
    server = TargetServer(target, cfg.target.name_or_path, host=host, port=port, max_batch=max_batch,
                          default_max_tokens=cfg.data.max_new_tokens, fail_first=fail_first)
    click.echo(f"serving {cfg.target.name_or_path} on http://{host}:{server.port}", err=True)
    server.serve_forever()


@main.group()
def cache():
    """Hidden-state caches: build, inspect, verify, estimate."""


@cache.command("build")
@_config_options
@click.option("--rebuild", is_flag=True, help="Delete an existing cache (e.g. one made from older data) first.")
@_friendly_errors
def cache_build(recipe, overrides, rebuild):
    """Capture the target's hidden states of the prepared conversations into a zstd cache.

    One process; for several (each writes its own shards, the cache is the same) use the launcher:
    deepspeed --num_gpus 2 launcher/build_cache.py --config R

    \b
    Example:
      dspark cache build -c smollm2_dspark --set cache.zstd_level=6
    """
    cfg = _load(recipe, overrides)
    _quiet_libraries()
    from dspark import stages

    click.echo(f"cache: {stages.build_cache(cfg, rebuild=rebuild)}")


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
    """Recompute every shard checksum; exit non-zero listing every corrupt shard and sample (with its offset).

    \b
    Example:
      dspark cache verify runs/smollm2_dspark/cache
    """
    from dspark.cache import CacheCorruptError, CacheReader

    reader = CacheReader(Path(cache_dir))
    try:
        count = reader.verify()
    except CacheCorruptError as exc:
        for fault in getattr(exc, "faults", [exc]):
            click.echo(f"corrupt: {fault}", err=True)
        raise
    click.echo(f"ok: {count} samples in {len(reader.manifest['shards'])} shards verified")


@cache.command("estimate")
@click.option("--target", help="Builtin name (qwen3-4b, qwen3-8b, qwen3-14b, qwen3-32b, deepseek-v3, smollm2) "
                               "or a local HF model dir / config.json.")
@click.option("--hidden-size", type=int, help="Instead of --target: the target's hidden size H.")
@click.option("--num-layers", type=int, help="How many feature layers are cached (default: 5, or the target's).")
@click.option("--layer-ids", help="Comma-separated feature layer ids (default: the target's).")
@click.option("--num-tokens", type=float, required=True, help="Tokens to cache, e.g. 1.24e9.")
@click.option("--codec", type=click.Choice(choices(Codec)), default="bf16", show_default=True)
@click.option("--zstd-level", type=int, default=3, show_default=True)
@click.option("--mask-bytes", type=click.IntRange(1, 2), default=1, show_default=True,
              help="uint8 masks per token in DeepSpec's raw layout.")
@click.option("--ratios", type=click.Path(dir_okay=False),
              help="Measured codec ratios (default: benchmarks/results/cache_codecs.json).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_friendly_errors
def cache_estimate(target, hidden_size, num_layers, layer_ids, num_tokens, codec, zstd_level, mask_bytes, ratios,
                   as_json):
    """Project a cache's size before building it, next to DeepSpec's uncompressed layout.

    \b
    Example:
      dspark cache estimate --target qwen3-4b --num-tokens 1.24e9 --codec fp8
    """
    from dspark.cache.estimate import estimate, format_estimate

    try:
        ids = [int(x) for x in layer_ids.split(",")] if layer_ids else None
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {layer_ids!r}",
                                 param_hint="--layer-ids") from None
    est = estimate(num_tokens=int(num_tokens), target=target, hidden_size=hidden_size, num_layers=num_layers,
                   layer_ids=ids, codec=codec, zstd_level=zstd_level, mask_bytes=mask_bytes,
                   ratios_path=Path(ratios) if ratios else None)
    click.echo(json.dumps(est, indent=2) if as_json else format_estimate(est))


@main.command()
@_config_options
@_friendly_errors
def train(recipe, overrides):
    """Train the drafter on the cache inside a DeepSpeed engine (one process).

    With --set train.online=true there is no cache: the target runs in the same job on the prepared
    conversations and feeds its features straight to the drafter. For several processes or nodes use the
    launcher: deepspeed --num_gpus 2 launcher/train.py --config R

    \b
    Example:
      dspark train -c smollm2_dspark --set train.max_steps=50
      dspark train -c smollm2_dspark --set train.online=true
    """
    cfg = _load(recipe, overrides)
    _quiet_libraries()
    from dspark import stages

    result = stages.train(cfg)
    click.echo(f"trained {result.steps} steps, final loss {result.final_loss:.4f}, "
               f"{result.tokens_per_s:.0f} block tokens/s")
    click.echo(f"drafter: {result.drafter_dir}\ncheckpoints: {result.checkpoint_dir}\n"
               f"tensorboard: {result.tensorboard_dir}")


def _drafter_specs(specs: tuple[str, ...]) -> dict[str, Path]:
    """``--drafter [NAME=]DIR`` values as {name: directory}; a bare DIR is named after the directory."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or os.sep in name:
            name, directory = Path(spec).name or spec, spec
        if name in out:
            raise click.BadParameter(f"two drafters named {name!r}: name them with NAME=DIR", param_hint="--drafter")
        out[name] = Path(directory)
    return out


@main.command("eval")
@_config_options
@click.option("--drafter", "drafter_specs", multiple=True, metavar="[NAME=]DIR",
              help="Drafter directory to evaluate (repeatable: one report row and plot line each; default: "
                   "<run_dir>/drafter next to an untrained drafter).")
@click.option("--dataset", "datasets", multiple=True, metavar="NAME[,NAME...]",
              help="Evaluate on fetched benchmarks instead of the held-out prompts (repeatable or "
                   "comma-separated; see `dspark data fetch-benchmarks`).")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help='Evaluate on a jsonl file of {"turns": [...]} or {"prompt": ...} rows (its dataset name is '
                   "the file stem); combines with --dataset.")
@_friendly_errors
def eval_cmd(recipe, overrides, drafter_specs, datasets, prompts_file):
    """Speculative decoding of the trained drafter (and an untrained one) against the target.

    Reports per dataset and temperature: tau (accepted length incl. the bonus token), per-position conditional
    acceptance, prefix survival, mean proposal length, generated tokens/s, and the confidence head's
    calibration (ECE, AUROC, Brier) for drafters that have one. Writes <run_dir>/eval/report.json, acceptance
    and reliability PNGs there, and TensorBoard scalars under <run_dir>/tensorboard. One process; with a target
    hosted across processes use `deepspeed launcher/eval.py` (same options).

    \b
    Example:
      dspark eval -c smollm2_dspark --set eval.num_prompts=8 --set eval.batch_size=8
      dspark eval -c smollm2_dspark --dataset gsm8k --dataset humaneval,mt-bench
      dspark eval -c smollm2_dspark --prompts my_prompts.jsonl --drafter a=runs/a/drafter --drafter runs/b/drafter
    """
    cfg = _load(recipe, overrides)
    drafters = _drafter_specs(drafter_specs)
    _quiet_libraries()
    from dspark import stages

    stages.evaluate(cfg, drafter_dirs=drafters or None, datasets=list(datasets) if datasets else None,
                      prompts_file=prompts_file)
    click.echo(f"report: {Path(cfg.run_dir) / 'eval' / 'report.json'}")


@main.command()
@_config_options
@click.option("--drafter", "drafter_dir", default=None, type=click.Path(file_okay=False),
              help="Drafter directory to calibrate (default: <run_dir>/drafter); calibration.json is written there.")
@click.option("--dataset", "datasets", multiple=True, metavar="NAME[,NAME...]",
              help="Calibrate on fetched benchmarks instead of the held-out prompts (repeatable or comma-separated).")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help='Calibrate on a jsonl file of {"turns": [...]} or {"prompt": ...} rows; combines with --dataset.')
@click.option("--scheduler-sps", "scheduler_sps", default=None, type=click.Path(dir_okay=False),
              help="SPS table of the verifier (tools/profile_sps.py): also simulate the prefix scheduler "
                   "(paper Algorithm 1 and its asynchronous form) on the held-out rounds.")
@_friendly_errors
def calibrate(recipe, overrides, drafter_dir, datasets, prompts_file, scheduler_sps):
    """Fit Sequential Temperature Scaling of the drafter's confidence head and write calibration.json.

    Runs speculative decoding at eval.calibration_temperature, fits one temperature per draft slot on half of the
    prompts (grid eval.sts_min_temperature..eval.sts_max_temperature in steps of eval.sts_step) and reports the
    ECE of the cumulative confidence product before/after on the other half. `dspark eval` and
    eval.confidence_threshold then use the calibrated confidences.

    \b
    Example:
      dspark calibrate -c smollm2_dspark --set eval.num_prompts=32
      dspark calibrate -c smollm2_dspark --dataset gsm8k --scheduler-sps sps_smollm2.json
    """
    cfg = _load(recipe, overrides)
    _quiet_libraries()
    from dspark import stages

    out = stages.calibrate(cfg, drafter_dir=Path(drafter_dir) if drafter_dir else None,
                             datasets=list(datasets) if datasets else None, prompts_file=prompts_file,
                             scheduler_sps=scheduler_sps)
    click.echo(f"calibration: {out['calibration_json']}")


@main.group()
def data():
    """Prompt data: fetch training prompts, and public benchmarks for `dspark eval --dataset`."""


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


@data.command("fetch-prompts")
@click.argument("source", default="mlabonne/open-perfectblend")
@click.option("--out-dir", default="data/prompts", show_default=True, type=click.Path(file_okay=False),
              help="Where to write train.jsonl (and eval.jsonl).")
@click.option("--num-eval", default=0, show_default=True, type=int, help="Conversations held out (seeded).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-rows", default=0, type=int, help="Read at most this many rows (0 = all).")
@click.option("--split", default="train", show_default=True, help="Dataset split (hub sources).")
@_friendly_errors
def data_fetch_prompts(source, out_dir, num_eval, seed, max_rows, split):
    """Training prompts from a Hugging Face dataset id or a local .jsonl/.parquet file, as {"turns": [...]} rows.

    Normalises roles (ShareGPT human/gpt, OpenAI user/assistant), keeps conversations whose first turn is the
    user's with no empty turn, drops duplicates, and holds --num-eval out with a seeded split.

    \b
    Example:
      dspark data fetch-prompts mlabonne/open-perfectblend --max-rows 20000 --num-eval 200
      dspark prepare -c qwen3_8b_dspark --set data.prompts=data/prompts/train.jsonl
    """
    from dspark.data.fetch_prompts import fetch_prompts

    out = fetch_prompts(source, out_dir, num_eval=num_eval, seed=seed, max_rows=max_rows, split=split)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(out["skipped"].items())) or "none"
    click.echo(f"read {out['read']} rows, kept {out['kept']} (skipped: {skipped}); "
               f"{out['train']} train, {out['eval']} held out")
    for name, path in out["paths"].items():
        click.echo(f"{name}: {path}")


@main.command()
@click.argument("drafter_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", default="deepspec", show_default=True,
              type=click.Choice(sorted(EXPORT_FORMATS)),
              help="Attach-on layout to write (speculators: vLLM speculators' format; eagle3: SGLang/vLLM "
                   "LlamaForCausalLMEagle3, exactly 3 feature layers).")
@click.option("--verifier", default=None, metavar="NAME_OR_PATH",
              help="Target the export names as its verifier: an HF directory, hub id or dspark target "
                   "(builtin:... targets are written as an HF directory first). Default: the run's target.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR whole (refused otherwise).")
@_friendly_errors
def export(drafter_dir, out_dir, fmt, verifier, overwrite):
    """Export a trained drafter as a Hugging Face attach-on checkpoint, and print the command that serves it.

    \b
    Example:
      dspark export runs/smollm2_dspark/drafter exported/ --format deepspec
      dspark export runs/smollm2_eagle3_serve/drafter e3/ --format eagle3 --verifier builtin:smollm2
    """
    from dspark import stages
    from dspark.export.serve import serve_commands

    out = stages.export(Path(drafter_dir), Path(out_dir), fmt, verifier=verifier, overwrite=overwrite)
    click.echo(f"exported: {out}")
    spec = json.loads((out / "config.json").read_text())
    named = (spec.get("speculators_config") or {}).get("verifier", {}).get("name_or_path")
    for command in serve_commands(fmt, out, named or stages.verifier_name(Path(drafter_dir), verifier, fmt)):
        click.echo(f"serve: {command}")


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
