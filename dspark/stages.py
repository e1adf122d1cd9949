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

from dspark import distributed as dist_utils
from dspark.config import RunConfig
from dspark.paths import RunPaths


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


def prepare(cfg: RunConfig, target=None, progress: bool = True, restart: bool = False) -> dict[str, Path]:
    """Regenerate answers to the training prompts with the target; hold out evaluation prompts.

    Runs as one process, or on every rank of an initialised process group (``launcher/prepare.py``): the
    prompts are split over the target's generate groups (``TargetBackend.generate_group``), the rows gathered,
    and rank 0 writes them. Each prompt samples from (seed, its index) alone, so the files are the same whatever
    the number of ranks or the batch size. Rows are written in prompt order as chunks finish, crash-safe
    (``dspark.data.output``): rerunning after a kill resumes where it stopped, rerunning a finished job does
    nothing, and ``restart`` discards a partial run made with other settings.
    """
    from dspark.data.output import ResumableJsonl
    from dspark.data.prompts import load_prompts, load_turns, split_prompts
    from dspark.data.regenerate import regenerate_resumable, write_jsonl
    from dspark.targets import load_target

    paths = RunPaths(Path(cfg.run_dir))
    prompts = load_prompts(cfg.data.prompts, cfg.data.max_prompts)
    train_prompts, eval_prompts = split_prompts(prompts, cfg.data.num_eval_prompts, cfg.data.seed)
    turns = None
    if cfg.data.max_turns > 1:
        all_turns = load_turns(cfg.data.prompts, cfg.data.max_prompts, cfg.data.max_turns)
        turns, _ = split_prompts(all_turns, cfg.data.num_eval_prompts, cfg.data.seed)
    elif cfg.data.max_turns < 1:
        raise ValueError(f"data.max_turns must be >= 1, got {cfg.data.max_turns}")
    if cfg.data.servers:
        _prepare_with_servers(cfg, paths, train_prompts, turns, restart, progress)
        write_jsonl(paths.eval_prompts, [{"turns": [p]} for p in eval_prompts])
        cfg.save(paths.root / "config.json")
        return {"train_data": paths.train_data, "eval_prompts": paths.eval_prompts}
    target = target or load_target(cfg.target, device=dist_utils.local_device())
    if cfg.data.self_prompts:
        from dspark.data.grow import LocalGenerate, add_self_prompts

        if dist_utils.world_size() > 1:
            raise ValueError("data.self_prompts runs in one process (`dspark prepare --set data.self_prompts=N`) or "
                             "through servers, not under a launcher")
        gen = LocalGenerate(target, max_new_tokens=cfg.data.max_new_tokens, temperature=cfg.data.regen_temperature,
                            batch_size=cfg.data.regen_batch_size)
        train_prompts, turns = add_self_prompts(cfg.data, paths.train_data.parent, gen, target.tokenizer,
                                                train_prompts, turns, target.identity().name, restart, progress)
    if cfg.data.followup_turns and turns is None:
        turns = [[p] for p in train_prompts]
    settings = _regeneration_settings(cfg, target, train_prompts)
    if turns is not None:
        import hashlib

        settings["turns_sha"] = hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()[:16]
    writer = dist_utils.rank() == 0
    output, error = None, None
    if writer:
        try:
            output = ResumableJsonl(paths.train_data, settings, restart=restart)
        except ValueError as exc:
            error = exc
    if dist_utils.world_size() > 1:  # every rank resumes from rank 0's rows, or fails with its error
        state = dist_utils.all_gather_objects((error, None if output is None else (output.complete, output.rows)))[0]
        error, shared = state
        if not writer and shared is not None:
            output = _ReadOnlyRows(*shared)
    if error is not None:
        raise error
    if output.complete:
        if writer:
            print(f"{paths.train_data} is already complete for these settings; nothing to regenerate")
    else:
        regenerate_resumable(
            target, train_prompts, output, max_new_tokens=cfg.data.max_new_tokens,
            temperature=cfg.data.regen_temperature, batch_size=cfg.data.regen_batch_size, seed=cfg.data.seed,
            max_seq_len=cfg.data.max_seq_len, progress=progress and writer, group=target.generate_group(),
            gather=_gather_rows if dist_utils.world_size() > 1 else None, is_writer=writer,
            samples_per_prompt=cfg.data.samples_per_prompt, turns=turns, followups=cfg.data.followup_turns,
        )
        if writer:
            output.finish()
    if writer:
        write_jsonl(paths.eval_prompts, [{"turns": [p]} for p in eval_prompts])
        cfg.save(paths.config)
    dist_utils.barrier()
    return {"train_data": paths.train_data, "eval_prompts": paths.eval_prompts}


def _prepare_with_servers(cfg: RunConfig, paths: RunPaths, train_prompts: list[str], turns, restart: bool,
                          progress: bool) -> None:
    """``prepare`` through OpenAI-compatible servers (``dspark.data.server``); this process only."""
    import hashlib

    from dspark.data.grow import add_self_prompts
    from dspark.data.output import ResumableJsonl
    from dspark.data.regenerate import plan
    from dspark.data.server import (
        ServerGenerate,
        ServerOptions,
        load_tokenizer,
        probe,
        regenerate_turns_with_servers,
        regenerate_with_servers,
        served_model,
    )

    if dist_utils.world_size() > 1:
        raise ValueError("server regeneration runs in one process (`dspark prepare --server URL`), not under a "
                         "launcher: the servers do the parallel work")
    opts = ServerOptions.from_config(cfg.data)
    opts.validate()
    for url in opts.urls:  # an unreachable server fails before anything loads
        probe(url)
    tokenizer = load_tokenizer(cfg.target.name_or_path)
    if cfg.data.self_prompts:
        gen = ServerGenerate(tokenizer, opts, served_model(opts))
        try:
            train_prompts, turns = add_self_prompts(cfg.data, paths.train_data.parent, gen, tokenizer, train_prompts,
                                                    turns, cfg.target.name_or_path, restart, progress)
        finally:
            gen.close()
    if cfg.data.followup_turns and turns is None:
        turns = [[p] for p in train_prompts]
    if turns is not None and opts.samples_per_prompt != 1:
        raise ValueError("data.samples_per_prompt must be 1 with several turns (data.max_turns or "
                         "data.followup_turns)")
    settings = {**opts.settings(), "tokenizer": cfg.target.name_or_path,
                "prompts_sha": hashlib.sha256(json.dumps(train_prompts, ensure_ascii=False).encode()).hexdigest()[:16],
                "num_prompts": len(train_prompts)}
    if turns is not None:
        settings.update(max_turns=cfg.data.max_turns, followup_turns=cfg.data.followup_turns,
                        turns_sha=hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()[:16])
    output = ResumableJsonl(paths.train_data, settings, restart=restart)
    errors = ResumableJsonl(paths.train_data.with_name("train.errors.jsonl"), settings, restart=restart)
    if output.complete and errors.complete:
        print(f"{paths.train_data} is already complete for these settings; nothing to regenerate")
        return
    prefixes, keep = plan(tokenizer, train_prompts, opts.max_seq_len)
    if turns is not None:
        counts = regenerate_turns_with_servers(tokenizer, turns, keep, output, errors, opts,
                                               cfg.data.followup_turns, progress)
    else:
        counts = regenerate_with_servers(tokenizer, train_prompts, prefixes, keep, output, errors, opts, progress)
    output.finish()
    errors.finish()
    failed = len(errors.rows)
    print(f"server regeneration: {len(output.rows)} conversations in {paths.train_data} ({counts['written']} this "
          f"run, {counts['truncated']} cut at max_new_tokens); {failed} failed or dropped"
          + (f", listed in {errors.path}" if failed else ""))


class _ReadOnlyRows:
    """What a non-writing rank knows of the output: rank 0's completion flag and rows."""

    def __init__(self, complete: bool, rows: list[dict]):
        self.complete, self.rows = complete, rows


def _regeneration_settings(cfg: RunConfig, target, train_prompts: list[str]) -> dict:
    """Everything that changes the regenerated rows (never the batch size or the number of ranks)."""
    import hashlib

    identity = target.identity()
    template = identity.chat_template or ""
    return {
        "source": "in-process",
        "target": identity.name, "config_hash": identity.config_hash, "tokenizer_hash": identity.tokenizer_hash,
        "chat_template_sha": hashlib.sha256(template.encode()).hexdigest()[:16],
        "prompts_sha": hashlib.sha256(json.dumps(train_prompts, ensure_ascii=False).encode()).hexdigest()[:16],
        "num_prompts": len(train_prompts),
        "max_new_tokens": cfg.data.max_new_tokens, "max_seq_len": cfg.data.max_seq_len,
        "temperature": cfg.data.regen_temperature, "seed": cfg.data.seed,
        **({"samples_per_prompt": cfg.data.samples_per_prompt} if cfg.data.samples_per_prompt != 1 else {}),
        **({"max_turns": cfg.data.max_turns} if cfg.data.max_turns != 1 else {}),
        **({"followup_turns": cfg.data.followup_turns} if cfg.data.followup_turns else {}),
    }


def _gather_rows(rows: list[dict]) -> list[dict]:
    """Every rank's conversation rows, by id; the ranks of one generate group hold copies that must agree."""
    merged: dict[str, dict] = {}
    for rank, theirs in enumerate(dist_utils.all_gather_objects(rows)):
        for row in theirs:
            seen = merged.setdefault(row["id"], row)
            if seen["input_ids"] != row["input_ids"]:
                raise RuntimeError(f"conversation {row['id']}: rank {rank} generated different tokens than another "
                                   f"rank of its generate group; the group fell out of lockstep")
    return [merged[key] for key in sorted(merged, key=lambda k: (len(k), k))]  # p00009 < p00010 < p100000


def build_cache(cfg: RunConfig, target=None, progress: bool = True, rebuild: bool = False) -> Path:
    """Capture the target's hidden states for the prepared conversations into the zstd cache.

    Runs as one process, or on every rank of an initialised process group (``launcher/build_cache.py``):
    each rank captures a disjoint, fixed slice into its own shards, then rank 0 writes the manifest. The
    cache is the same, sample for sample and bit for bit, whatever the number of ranks. An existing cache is
    resumed only if its samples are these conversations (per-sample content hashes); otherwise it is refused,
    or with ``rebuild`` its files are deleted first.
    """
    from dspark.cache.build import build_cache as _build
    from dspark.cache.writer import finalize_cache
    from dspark.data.regenerate import read_conversations
    from dspark.targets import load_target

    rank, world = dist_utils.rank(), dist_utils.world_size()
    paths = RunPaths(Path(cfg.run_dir))
    if not paths.train_data.is_file():
        raise ValueError(f"no prepared data at {paths.train_data}: run `dspark prepare` with this config first")
    conversations = read_conversations(paths.train_data)
    target = target or load_target(cfg.target, device=dist_utils.local_device())
    if rebuild and rank == 0:
        from dspark.cache.format import remove_cache_files

        remove_cache_files(paths.cache)
    dist_utils.barrier()
    _build(target, conversations, paths.cache, cfg.cache, progress=progress and rank == 0, rank=rank,
           world_size=world, finalize=False)
    dist_utils.barrier()  # every rank's shards are finished before the manifest lists them
    if rank == 0:
        finalize_cache(paths.cache, target.identity())
    dist_utils.barrier()
    return paths.cache


def train(cfg: RunConfig, progress: bool = True):
    """Train the drafter in a DeepSpeed engine on the cache, or online on the prepared conversations
    (``train.online``); this process only, use launcher/train.py for many."""
    from dspark.train.trainer import train as _train

    return _train(cfg, progress=progress)


def evaluate(cfg: RunConfig, target=None, drafter_dir: Path | None = None, progress: bool = True,
             datasets: list[str] | None = None, drafter_dirs: dict[str, Path] | None = None,
             prompts_file: str | None = None) -> dict:
    """Speculative decoding on the held-out prompts: the trained drafter next to an untrained one.

    ``drafter_dirs`` ({name: directory}) evaluates exactly those drafters instead (``drafter_dir`` replaces just
    the trained one). ``datasets`` (default ``cfg.eval.datasets``) names fetched benchmarks
    (``dspark.data.benchmarks``) and ``prompts_file`` a jsonl of {"turns": [...]} or {"prompt": ...} rows to
    evaluate on instead of the held-out prompts, each capped at ``eval.num_prompts``; their report keys are
    ``"<dataset>/T<temp>"`` (a prompt file's dataset is its file stem) rather than ``"T<temp>"``. With
    ``eval.confidence_threshold`` > 0 every drafter that reports confidences is also run with that cut, as
    ``"<name>@c<threshold>"``. ``eval.verify_policy`` chooses how many drafts the target verifies per round
    (``dspark.eval.scheduler``); with ``eval.policy_sweep`` the first drafter is also timed under those policies at
    each of ``eval.sweep_batch_sizes`` (``dspark.eval.policies``): ``eval/policies.json`` and a throughput plot.
    """
    import torch

    from dspark.data.benchmarks import load_benchmark, parse_names
    from dspark.data.chat import prompt_ids
    from dspark.data.prompts import load_prompts
    from dspark.drafters import build_drafter
    from dspark.eval.specdec import NoDrafts
    from dspark.eval.specdec import evaluate as run_eval
    from dspark.export import load_drafter
    from dspark.targets import load_target
    from dspark.train.metrics import MetricsLogger

    ev = cfg.eval
    if ev.batch_size < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {ev.batch_size}")
    if not 0.0 <= ev.confidence_threshold < 1.0:
        raise ValueError(f"eval.confidence_threshold must be in [0, 1) (0 = off), got {ev.confidence_threshold}")
    _check_verify_policies(ev)
    paths = RunPaths(Path(cfg.run_dir))
    if drafter_dirs is None:
        drafter_dirs = {"trained": Path(drafter_dir) if drafter_dir else paths.drafter}
        with_untrained = True
    else:
        with_untrained = False
    if not drafter_dirs:
        raise ValueError("evaluate needs at least one drafter directory")
    for name, directory in drafter_dirs.items():
        if not (Path(directory) / "config.json").is_file():
            hint = "run `dspark train` with this config first" if name == "trained" and with_untrained else \
                "expected an exported drafter directory"
            raise ValueError(f"no trained drafter at {directory} (drafter {name!r}): {hint}")
    names = parse_names(ev.datasets if datasets is None else datasets)
    if not names and not prompts_file and not paths.eval_prompts.is_file():
        raise ValueError(f"no held-out prompts at {paths.eval_prompts}: run `dspark prepare` first")
    # Prompt sets are read before the target loads so that a missing benchmark fails fast. "" = held out.
    prompt_sets = {name: load_benchmark(name, ev.data_dir or None, ev.num_prompts) for name in names}
    if prompts_file:
        stem = Path(prompts_file).stem
        if stem in prompt_sets:
            raise ValueError(f"prompt file {prompts_file} is named like benchmark {stem!r}: rename the file")
        prompt_sets[stem] = load_prompts(str(prompts_file), ev.num_prompts)
    if not prompt_sets:
        prompt_sets[""] = load_prompts(str(paths.eval_prompts), ev.num_prompts)
    target = target or load_target(cfg.target, device=dist_utils.local_device())
    device = target.embed_weight.device  # drafters run where the target's logits are
    # Any export format; formats without the frozen embedding / LM head take them from this target.
    drafters = {name: load_drafter(directory, verifier=target).to(device).eval()
                for name, directory in drafter_dirs.items()}
    if with_untrained:
        torch.manual_seed(cfg.train.seed)  # the same initialisation the trained drafter started from
        drafters["untrained"] = build_drafter(cfg.drafter, target.config, cfg.target.layer_ids, target.embed_weight,
                                              target.lm_head_weight).to(device).eval()
    stop_ids = sorted({i for i in [target.tokenizer.eos_token_id] if i is not None})
    sps = _scheduler_sps(cfg, device, max(d.block_size for d in drafters.values()))

    # In a process group every rank runs the same loop (decoding is split by target.decode_group() inside
    # run_eval and gathered back, so every rank holds every report); rank 0 alone prints and writes.
    writer = dist_utils.rank() == 0
    progress = progress and writer
    results: dict[str, dict] = {}
    sweeps: dict[str, dict] = {}
    if writer:
        paths.eval_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(paths.tensorboard)
    for dataset, prompts in prompt_sets.items():
        prompt_token_ids = [prompt_ids(target.tokenizer, p) for p in prompts]
        for temperature in ev.temperatures:
            reports = {}
            kwargs = {"max_new_tokens": ev.max_new_tokens, "temperature": temperature, "seed": ev.seed,
                      "stop_ids": stop_ids, "progress": progress, "batch_size": ev.batch_size}
            # Plain target decoding of the same prompts at the same batch size: the tokens/s baseline.
            target_tokens_per_s = run_eval(target, NoDrafts(target), prompt_token_ids, **kwargs).tokens_per_s
            for name, drafter in drafters.items():
                threshold = ev.confidence_threshold if ev.verify_policy == "threshold" else 0.0
                reports[name] = run_eval(target, drafter, prompt_token_ids, verify_policy=ev.verify_policy, sps=sps,
                                         confidence_threshold=threshold, **kwargs)
                if ev.confidence_threshold > 0 and reports[name].calibration is not None and not threshold:
                    reports[f"{name}@c{ev.confidence_threshold:g}"] = run_eval(
                        target, drafter, prompt_token_ids, confidence_threshold=ev.confidence_threshold, **kwargs)
            for report in reports.values():
                report.target_tokens_per_s = target_tokens_per_s
            tag = f"T{temperature:g}"
            key, file_tag = (f"{dataset}/{tag}", f"{dataset}_{tag}") if dataset else (tag, tag)
            results[key] = {name: r.to_dict() for name, r in reports.items()}
            for name in reports:
                results[key][name]["verify_policy"] = "threshold" if "@c" in name else ev.verify_policy
            if writer:
                _write_eval_reports(reports, logger, paths.eval_dir, len(prompts), dataset, temperature, file_tag)
            if ev.policy_sweep:
                name = next(iter(drafters))
                sweeps[key] = _policy_sweep(cfg, target, name, drafters[name], prompt_token_ids, temperature, sps,
                                            stop_ids, progress, paths.eval_dir / f"throughput_{file_tag}.png", writer)
    if writer:
        logger.close()
        (paths.eval_dir / "report.json").write_text(json.dumps(results, indent=2) + "\n")
        if sweeps:
            (paths.eval_dir / "policies.json").write_text(json.dumps(sweeps, indent=2) + "\n")
    dist_utils.barrier()
    return results


def _check_verify_policies(ev) -> None:
    for key, policy in [("verify_policy", ev.verify_policy)] + [("policy_sweep", p) for p in ev.policy_sweep]:
        if policy == "threshold" and ev.confidence_threshold <= 0:
            raise ValueError(f"eval.{key}=threshold needs eval.confidence_threshold > 0, got {ev.confidence_threshold}")
    if ev.policy_sweep and (not ev.sweep_batch_sizes or any(b < 1 for b in ev.sweep_batch_sizes)):
        raise ValueError(f"eval.sweep_batch_sizes must be positive integers, got {ev.sweep_batch_sizes}")


def _scheduler_sps(cfg: RunConfig, device, gamma: int):
    """This device's SPS table when a scheduler policy will run (``dspark.eval.policies.load_device_sps``), sized
    for the largest batch of requests, each verifying up to gamma drafts; None otherwise."""
    from dspark.eval.policies import load_device_sps

    ev = cfg.eval
    policies = [ev.verify_policy] + list(ev.policy_sweep)
    if not any(p.startswith("scheduler") for p in policies):
        return None
    rows = max([ev.batch_size] + (list(ev.sweep_batch_sizes) if ev.policy_sweep else []))
    return load_device_sps(ev.sps_table, cfg.run_dir, device, max_rows=rows, gamma=gamma)


def _policy_sweep(cfg: RunConfig, target, name: str, drafter, prompts: list, temperature: float, sps, stop_ids,
                  progress: bool, plot_path: Path, writer: bool) -> dict:
    """Time ``drafter`` under ``eval.policy_sweep`` at each of ``eval.sweep_batch_sizes``; print, plot, return."""
    from dspark.eval.metrics import json_safe
    from dspark.eval.plots import plot_policy_throughput
    from dspark.eval.policies import format_policy_table, policy_sweep

    ev = cfg.eval
    rows = policy_sweep(target, drafter, prompts, policies=list(ev.policy_sweep),
                        batch_sizes=list(ev.sweep_batch_sizes), sps=sps, max_new_tokens=ev.max_new_tokens,
                        temperature=temperature, seed=ev.seed, stop_ids=stop_ids,
                        confidence_threshold=ev.confidence_threshold, progress=progress)
    if writer:
        print(f"\nverify policies of drafter {name!r} at temperature {temperature:g} (speedup: tokens/s over full at "
              f"the same batch size, measured; sim.: predicted by the scheduler simulation from full's rounds)")
        print(format_policy_table(rows))
        plot_policy_throughput(rows, plot_path, title=f"{name}, T = {temperature:g}")
    return {"drafter": name, "sps": getattr(sps, "source", None), "rows": json_safe(rows)}


def _write_eval_reports(reports: dict, logger, eval_dir: Path, num_prompts: int, dataset: str, temperature: float,
                        file_tag: str) -> None:
    """Print the tables of one (dataset, temperature) cell, plot it and log it to TensorBoard."""
    from dspark.eval.metrics import format_calibration_table
    from dspark.eval.plots import plot_acceptance, plot_reliability
    from dspark.eval.specdec import format_table

    print(f"\nspeculative decoding on {num_prompts} {dataset or 'held-out'} prompts, temperature {temperature:g}")
    print(format_table(reports))
    plot_acceptance(reports, eval_dir / f"acceptance_{file_tag}.png")
    if any(r.calibration is not None for r in reports.values()):
        print("\nconfidence head calibration (slot c_k vs acceptance; s. = cumulative product vs survival)")
        print(format_calibration_table(reports))
        plot_reliability(reports, eval_dir / f"reliability_{file_tag}.png")
    for name, r in reports.items():
        _log_eval_report(logger, f"eval_{file_tag}/{name}", r)


def _log_eval_report(logger, prefix: str, report) -> None:
    """TensorBoard scalars of one report: summary numbers at step 0, per-position curves with step = k."""
    import math

    scalars = {"tau": report.tau, "mean_proposal_len": report.mean_proposal_len,
               "tokens_per_s": report.tokens_per_s}
    if report.calibration is not None:
        c = report.calibration
        scalars.update({"conf_ece": c.ece, "conf_auroc": c.auroc, "conf_brier": c.brier,
                        "conf_survival_ece": c.survival_ece})
    logger.log(0, {f"{prefix}/{k}": v for k, v in scalars.items() if not math.isnan(v)})
    for k, (acc, surv) in enumerate(zip(report.acceptance_K, report.survival_K), start=1):
        logger.log(k, {f"{prefix}/{name}": v for name, v in (("acceptance", acc), ("survival", surv))
                       if not math.isnan(v)})


def export(drafter_dir: Path, out_dir: Path, fmt: str = "deepspec", verifier: str | None = None,
           overwrite: bool = False) -> Path:
    """Write the trained drafter as an HF attach-on directory in ``fmt``.

    ``verifier`` (an HF directory, hub id or dspark target name; default: the run's ``target.name_or_path`` when
    ``drafter_dir`` is ``<run>/drafter``) is what the export names as its target: built-in targets are written as
    HF directories first (``dspark.export.verifier``), so an engine can load export and verifier as they are. A
    non-empty ``out_dir`` is refused unless ``overwrite`` (replaced whole). A ``calibration.json`` (``dspark
    calibrate``) travels with the ``deepspec`` and ``deepseek-v4-mtp`` layouts, whose loader applies it; the other
    formats have no confidence head, so it is left behind with a warning.
    """
    import warnings

    from dspark.eval.sts import CALIBRATION_FILE
    from dspark.export import FORMATS, detect_format, export_drafter, load_drafter
    from dspark.export.common import check_target_dir
    from dspark.export.verifier import plain_target_config, verifier_config

    if fmt not in FORMATS:  # before anything loads
        raise ValueError(f"export format {fmt!r} unknown; expected one of: {', '.join(sorted(FORMATS))}")
    check_target_dir(Path(out_dir), overwrite)
    detect_format(drafter_dir)  # "not a drafter directory" before the verifier is built
    verifier = verifier or _run_target_name(Path(drafter_dir))
    # deepspec and DeepSeek's mtp.* layout only cross-check dims (the mtp.* draft is attached inside the V4
    # checkpoint); the other engine formats name an HF directory an engine loads as their verifier.
    plain = fmt == "deepspec" or fmt.startswith("deepseek-v4-mtp")
    target_config = None
    if verifier:
        target_config = plain_target_config(verifier) if plain else verifier_config(verifier)
    drafter = load_drafter(drafter_dir, verifier=verifier)
    extra = {}
    calibration = Path(drafter_dir) / CALIBRATION_FILE
    if calibration.is_file():
        if plain:  # the formats that keep the confidence head; load_drafter applies the file
            extra[CALIBRATION_FILE] = calibration
        else:
            warnings.warn(f"{calibration} is not exported: format {fmt} carries no confidence head", stacklevel=2)
    return export_drafter(drafter, out_dir, fmt, target_config=target_config, overwrite=overwrite,
                          extra_files=extra)


def verifier_name(drafter_dir: Path, verifier: str | None = None, fmt: str = "deepspec") -> str | None:
    """The name an export's serving command uses for ``verifier`` or, by default, the run's target: the
    engine-loadable HF directory or hub id for the engine formats, the dspark target name for deepspec (read by
    ``dspark eval``); None when neither is known."""
    from dspark.export.verifier import verifier_source

    verifier = verifier or _run_target_name(Path(drafter_dir))
    if not verifier or fmt == "deepspec":
        return verifier
    return verifier_source(verifier)


def _run_target_name(drafter_dir: Path) -> str | None:
    """The run's ``target.name_or_path`` for a drafter inside a run directory (``<run>/drafter``); None outside."""
    from dspark.config import config_from_dict

    run_config = drafter_dir.parent / "config.json"
    if not run_config.is_file():
        return None
    return config_from_dict(json.loads(run_config.read_text())).target.name_or_path


def calibrate(cfg: RunConfig, target=None, drafter_dir: Path | None = None, progress: bool = True,
              datasets: list[str] | None = None, prompts_file: str | None = None,
              scheduler_sps: str | None = None) -> dict:
    """Sequential Temperature Scaling of the trained drafter's confidence head (``dspark.eval.sts``).

    Real speculative decoding (``eval.*`` settings, full proposals, no confidence cut) at
    ``eval.calibration_temperature`` over the held-out prompts, or the ``datasets`` / ``prompts_file`` prompts as
    in ``evaluate`` (pooled). The prompts are split in two halves (shuffled with ``eval.seed``): the temperatures
    are fitted on the first half's rounds, the ECE of the cumulative confidence product before / after is
    measured on the second's. Writes ``<drafter>/calibration.json``, which ``load_drafter`` applies from then on
    (an existing one is ignored while decoding and replaced). With ``scheduler_sps`` (an SPS table, see
    ``tools/profile_sps.py``) also replays the held-out rounds through the prefix scheduler
    (``dspark.eval.scheduler.simulate``, ``eval.batch_size`` requests per step) with calibrated confidences.
    """
    import random

    from dspark.data.benchmarks import load_benchmark, parse_names
    from dspark.data.chat import prompt_ids
    from dspark.data.prompts import load_prompts
    from dspark.eval import sts
    from dspark.eval.calibration import CalibrationReport
    from dspark.eval.scheduler import SPSTable
    from dspark.eval.specdec import DecodeStats, decode_prompts
    from dspark.export import load_drafter
    from dspark.targets import load_target

    ev = cfg.eval
    grid = sts.temperature_grid(ev.sts_min_temperature, ev.sts_max_temperature, ev.sts_step)
    if not ev.calibration_temperature >= 0:
        raise ValueError(f"eval.calibration_temperature must be >= 0 (0 = greedy), got {ev.calibration_temperature}")
    paths = RunPaths(Path(cfg.run_dir))
    drafter_dir = Path(drafter_dir) if drafter_dir else paths.drafter
    if not (drafter_dir / "config.json").is_file():
        raise ValueError(f"no trained drafter at {drafter_dir}: run `dspark train` with this config first")
    sps = SPSTable.load(scheduler_sps) if scheduler_sps else None  # a bad table fails before decoding
    names = parse_names(ev.datasets if datasets is None else datasets)
    prompts = [p for name in names for p in load_benchmark(name, ev.data_dir or None, ev.num_prompts)]
    if prompts_file:
        prompts += load_prompts(str(prompts_file), ev.num_prompts)
    if not names and not prompts_file:
        if not paths.eval_prompts.is_file():
            raise ValueError(f"no held-out prompts at {paths.eval_prompts}: run `dspark prepare` first")
        prompts = load_prompts(str(paths.eval_prompts), ev.num_prompts)
    if len(prompts) < 2:
        raise ValueError(f"calibrate needs at least 2 prompts (one half to fit, one held out), got {len(prompts)}; "
                         "raise eval.num_prompts or pass more prompts")

    drafter = load_drafter(drafter_dir, apply_calibration=False)  # the raw head: STS inverts its sigmoid
    if drafter.confidence_head is None:
        raise ValueError(f"drafter at {drafter_dir} has no confidence head to calibrate "
                         f"(algorithm {drafter.algorithm}, drafter.dspark.enable_confidence_head off)")
    target = target or load_target(cfg.target, device=dist_utils.local_device())
    device = target.embed_weight.device
    drafter = drafter.to(device).eval()
    gamma = drafter.block_size
    token_ids = [prompt_ids(target.tokenizer, p) for p in prompts]
    stop_ids = sorted({i for i in [target.tokenizer.eos_token_id] if i is not None})
    decode_stats = DecodeStats()  # says whether the verifier pads rows: the simulation plans as decoding would
    results, _ = decode_prompts(target, drafter, token_ids, max_new_tokens=ev.max_new_tokens,
                                temperature=ev.calibration_temperature, seed=ev.seed, batch_size=ev.batch_size,
                                stop_ids=stop_ids, progress=progress and dist_utils.rank() == 0, stats=decode_stats)
    order = list(range(len(prompts)))
    random.Random(ev.seed).shuffle(order)
    halves = {"fit": sorted(order[: (len(order) + 1) // 2]), "heldout": sorted(order[(len(order) + 1) // 2 :])}

    def rounds(indices):
        acc = [a for i in indices for a in results[i].accepted]
        prop = [p for i in indices for p in results[i].proposed]
        conf = [c for i in indices for c in results[i].confidences]
        return acc, prop, conf

    fit_acc, fit_prop, fit_conf = rounds(halves["fit"])
    held_acc, held_prop, held_conf = rounds(halves["heldout"])
    if not fit_acc or not held_acc:
        raise ValueError(f"no verification rounds in the {'fit' if not fit_acc else 'held-out'} half: raise "
                         "eval.max_new_tokens or use more prompts")
    temperatures = sts.fit_sts(fit_acc, fit_prop, sts.logits_from_confidences(fit_conf), grid)
    temperatures += [1.0] * (gamma - len(temperatures))  # slots no round reached (short budgets) stay as trained
    held_cal = sts.apply_temperatures(sts.logits_from_confidences(held_conf), temperatures)
    before = CalibrationReport.from_rounds(held_acc, held_prop, held_conf)
    after = CalibrationReport.from_rounds(held_acc, held_prop, held_cal)
    stats = {
        "ece_before": before.survival_ece, "ece_after": after.survival_ece,
        "ece_before_K": sts.survival_ece_K(held_acc, held_prop, held_conf),
        "ece_after_K": sts.survival_ece_K(held_acc, held_prop, held_cal),
        "slot_ece_before": before.ece, "slot_ece_after": after.ece,
        "num_fit_prompts": len(halves["fit"]), "num_fit_rounds": len(fit_acc),
        "num_heldout_prompts": len(halves["heldout"]), "num_heldout_rounds": len(held_acc),
        "sampling_temperature": ev.calibration_temperature,
        "grid": {"min": ev.sts_min_temperature, "max": ev.sts_max_temperature, "step": ev.sts_step},
    }
    stats["ece_before_K"] += [float("nan")] * (gamma - len(stats["ece_before_K"]))
    stats["ece_after_K"] += [float("nan")] * (gamma - len(stats["ece_after_K"]))
    if dist_utils.rank() != 0:  # every rank decoded and fitted the same; rank 0 alone writes and prints
        dist_utils.barrier()
        return {"temperatures": temperatures, **stats}
    path = sts.write_calibration(drafter_dir, temperatures, **stats)
    print(f"\nSequential Temperature Scaling at sampling temperature {ev.calibration_temperature:g}: fitted on "
          f"{len(fit_acc)} rounds of {len(halves['fit'])} prompts; ECE of prod c_i vs prefix survival on "
          f"{len(held_acc)} held-out rounds of {len(halves['heldout'])} prompts")
    print(sts.format_sts_table(temperatures, stats["ece_before_K"], stats["ece_after_K"], stats["ece_before"],
                               stats["ece_after"]))
    out = {"calibration_json": str(path), "temperatures": temperatures, **stats}
    if sps is not None:
        out["scheduler"] = _simulate_scheduler([results[i] for i in halves["heldout"]], held_cal, gamma, sps,
                                               ev.batch_size, scheduler_sps, padded=decode_stats.padded)
    dist_utils.barrier()
    return out


def _simulate_scheduler(results: list, calibrated: list[list[float]], gamma: int, sps, batch_size: int,
                        sps_path: str, padded: bool) -> dict:
    """Replay the rounds of ``results`` drafted to the full ``gamma`` (with their ``calibrated`` confidences, all
    rounds pooled in order) through the prefix scheduler, planned as decoding plans it (``padded``: the common
    prefix of a verifier that pads rows); print and return the per-policy numbers."""
    from dspark.eval.scheduler import format_simulation, simulate

    per_prompt = _split_rounds(calibrated, [len(r.accepted) for r in results])
    full = [[(a, c) for a, p, c in zip(r.accepted, r.proposed, conf) if p == gamma]
            for r, conf in zip(results, per_prompt)]
    num_full = sum(len(rounds) for rounds in full)
    simulation = simulate(full, num_drafts=gamma, sps=sps, batch_size=batch_size, padded=padded)
    print(f"\nprefix scheduler on {num_full} held-out rounds drafted fully ({len(calibrated) - num_full} cut short "
          f"left out), {batch_size} requests per step, SPS from {sps_path}"
          + (" (rows padded to the longest feed: one common prefix per step)" if padded else ""))
    print(format_simulation(simulation))
    return {"num_rounds": num_full, "padded": padded, **{k: v.to_dict() for k, v in simulation.items()}}


def _split_rounds(rows: list, counts: list[int]) -> list[list]:
    """``rows`` cut into consecutive pieces of ``counts`` rows (per-prompt rounds from the pooled list)."""
    out, start = [], 0
    for n in counts:
        out.append(rows[start : start + n])
        start += n
    return out
