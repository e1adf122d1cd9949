"""The training loop: one function over a step function, the same for every drafter algorithm.

The drafter supplies its loss (``Drafter.forward_loss``); the trainer only normalises it globally, steps the
DeepSpeed engine, and logs. Samples come from a ``SampleSource`` (``dspark.train.sources``): the cache, or the
target running in this job (``train.online``); the trainer never knows which, nor which algorithm it trains.
With ``train.eval_every`` it also measures the drafter being trained by real speculative decoding (``PeriodicEval``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dspark import distributed as dist_utils
from dspark.config import RunConfig
from dspark.train import checkpoint
from dspark.train.metrics import MetricsLogger, peak_rss_gb, tau_estimate
from dspark.train.sources import EpochBatches, open_source

log = logging.getLogger(__name__)


class NonFiniteLossError(ValueError, FloatingPointError):
    """A NaN/inf loss: the run stops without saving. A ValueError so the CLI reports it as a one-line error."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens_per_s: float
    wall_s: float
    drafter_dir: Path
    checkpoint_dir: Path
    tensorboard_dir: Path
    num_skipped: int = 0  # corrupt samples skipped (cache.skip_corrupt), all ranks and epochs of this run


def _plan_steps(num_samples: int, cfg: RunConfig, world: int) -> tuple[int, int, int]:
    per_rank = num_samples // world
    micro_per_epoch = per_rank // cfg.train.micro_batch_size
    steps_per_epoch = micro_per_epoch // cfg.train.grad_accum_steps
    total = steps_per_epoch * cfg.train.num_epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps) if total else cfg.train.max_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training data has {num_samples} samples: too few for micro batch {cfg.train.micro_batch_size} x grad "
            f"accumulation {cfg.train.grad_accum_steps} x world size {world}"
        )
    return per_rank, steps_per_epoch, total


def train(cfg: RunConfig, *, cache_dir: Path | None = None, conversations_path: Path | None = None,
          progress: bool = True, stop_after_steps: int | None = None) -> TrainResult:
    """Train ``cfg.drafter`` on the cache at ``cache_dir`` (default ``<run_dir>/cache``) inside DeepSpeed.

    With ``train.online`` there is no cache: the target runs in this process on the conversations at
    ``conversations_path`` (default ``<run_dir>/data/train.jsonl``) and its features go straight to the drafter.

    Every ``train.eval_every`` steps the current drafter decodes the held-out prompts
    (``<run_dir>/data/eval_prompts.jsonl``) against the target and rank 0 logs ``eval/*`` (``PeriodicEval``).

    Checkpoints go to ``<run_dir>/checkpoints`` every ``train.save_every`` steps and at the end; with
    ``train.resume`` the newest complete one is loaded first and the run continues exactly where it stopped.
    ``stop_after_steps`` pauses the run after that many optimizer steps (counted from step 0, with the LR
    schedule of the whole run): it saves a checkpoint and returns without writing the drafter.

    With ``cache.skip_corrupt`` the ranks that skip corrupt samples have fewer batches; every epoch still ends on
    all ranks at the same micro batch (``EpochBatches``), so such a run takes fewer steps than planned. Rank 0 logs
    each epoch's skipped count of all ranks (``data/skipped_corrupt``), also returned as ``TrainResult.num_skipped``.
    """
    import deepspeed
    from tqdm import tqdm

    from dspark.drafters import build_drafter
    from dspark.export.deepspec import export_deepspec

    rank, world = dist_utils.init_distributed()
    run_dir = Path(cfg.run_dir)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if rank == 0:
        cfg.save(run_dir / "config.json")

    cache_dir = Path(cache_dir) if cache_dir else run_dir / "cache"
    conversations_path = Path(conversations_path) if conversations_path else run_dir / "data" / "train.jsonl"
    # Checked before anything loads, so a misconfigured eval fails at once rather than after eval_every steps.
    periodic_eval = PeriodicEval(cfg, rank=rank) if cfg.train.eval_every else None
    source, frozen = open_source(cfg, cache_dir=cache_dir, conversations_path=conversations_path,
                                 device=dist_utils.local_device())
    if periodic_eval is not None and cfg.train.online:
        periodic_eval.target = source.target  # online: the target this job already hosts
    hf_config = frozen.hf_config
    per_rank, _, total_steps = _plan_steps(len(source), cfg, world)

    torch.manual_seed(cfg.train.seed)
    drafter = build_drafter(cfg.drafter, hf_config, cfg.target.layer_ids, frozen.embed_VH, frozen.lm_head_VH)
    if getattr(drafter, "needs_token_counts", False):  # a pruned draft vocab (Eagle3): the most frequent tokens
        from dspark.data.regenerate import read_conversations

        drafter.fit_draft_vocab(read_conversations(conversations_path))
    from dspark.train.drafter_hooks import prepare_drafter

    prepare_drafter(drafter, cfg, world)
    from dspark.train.ds_config import make_ds_config

    ds_config = make_ds_config(cfg.train, world_size=world, total_steps=total_steps)
    engine, _, _, _ = deepspeed.initialize(model=drafter, model_parameters=drafter.trainable_parameters(),
                                           config=ds_config)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    # Anchor sampling differs per rank (different data) but is reproducible for a given (seed, rank).
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)

    ckpt_dir = run_dir / "checkpoints"
    # What a checkpoint must match to be resumed into this run (JSON round trip: the record is JSON).
    run_info = {"drafter": json.loads(json.dumps(asdict(cfg.drafter)))}
    position = None
    if cfg.train.resume:
        defaults = {"drafter": json.loads(json.dumps(asdict(type(cfg.drafter)())))}
        position = checkpoint.load(engine, ckpt_dir, generator, rank=rank, world=world, run_info=run_info,
                                   run_defaults=defaults)
    position = position or checkpoint.Position(step=0, epoch=0, micro_in_epoch=0)
    saved_step = position.step if position.step else None
    stop_at = min(total_steps, stop_after_steps) if stop_after_steps is not None else total_steps

    def save_now() -> None:
        nonlocal saved_step
        if feed is not None:  # skipped samples move ranks' streams differently: keep each one's place
            position.stream_positions = dist_utils.all_gather_ints(feed.position)
        checkpoint.save(engine, ckpt_dir, position, generator, rank=rank, world=world,
                        keep_last=cfg.train.keep_last, run_info=run_info)
        saved_step = position.step

    logger = MetricsLogger(run_dir / "tensorboard", enabled=rank == 0)
    bar = tqdm(total=total_steps, initial=position.step, desc="train", unit="step",
               disable=not (progress and rank == 0))
    grad_accum = cfg.train.grad_accum_steps
    # At a checkpoint the accumulation is complete, so the micro-batch count is step x accumulation.
    micro, last_loss = position.step * grad_accum, float("nan")
    tokens_seen, num_skipped, wall_start = 0, 0, time.perf_counter()
    window = {"wait": 0.0, "start": time.perf_counter(), "tokens": 0}
    feed: EpochBatches | None = None
    finished = False  # every epoch done (fewer steps than planned when samples were skipped)
    try:
        num_epochs = cfg.train.num_epochs if not cfg.train.max_steps else 10**9
        for epoch in range(position.epoch, num_epochs):
            if epoch != position.epoch:
                position.epoch, position.micro_in_epoch, position.stream_positions = epoch, 0, None
            mbs = cfg.train.micro_batch_size
            start = position.stream_positions[rank] if position.stream_positions else position.micro_in_epoch * mbs
            feed = EpochBatches(source, seed=cfg.train.seed, epoch=epoch, rank=rank, world_size=world,
                                per_rank=per_rank, micro_batch_size=mbs, max_seq_len=cfg.data.max_seq_len, start=start)
            while position.step < stop_at:
                read_before = feed.read_s
                batch = feed.next_batch()
                window["wait"] += feed.read_s - read_before  # not the wait for other ranks to agree
                if batch is None:
                    break
                batch = {k: v.to(engine.device, dtype if v.is_floating_point() else v.dtype)
                         for k, v in batch.items()}
                loss, stats = _train_micro_step(engine, batch, generator, world, position.step)
                micro += 1
                position.micro_in_epoch += 1
                tokens_seen += stats["tokens"]
                window["tokens"] += stats["tokens"]
                if micro % grad_accum:
                    continue  # mid accumulation: DeepSpeed stepped no optimizer yet
                position.step += 1
                step = position.step
                last_loss = loss
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window["start"]
                    scalars = {
                        "loss/total": loss, **{f"loss/{k}": v for k, v in stats["terms"].items()},
                        **{f"accept_rate@{k + 1}": a for k, a in enumerate(stats["accept_K"])},
                        "tau_estimate": tau_estimate(torch.tensor(stats["accept_K"])),
                        "lr": engine.get_lr()[0],
                        "grad_norm": stats["grad_norm"] if stats["grad_norm"] is not None else float("nan"),
                        "tokens_per_s": window["tokens"] * world / max(elapsed, 1e-9),
                        "data_wait_fraction": window["wait"] / max(elapsed, 1e-9),
                        "memory/peak_rss_gb": peak_rss_gb(),
                    }
                    logger.log(step, scalars)
                    bar.set_postfix(loss=f"{loss:.3f}", tau=f"{scalars['tau_estimate']:.2f}")
                    window = {"wait": 0.0, "start": time.perf_counter(), "tokens": 0}
                if periodic_eval is not None and step % cfg.train.eval_every == 0:
                    t_eval = time.perf_counter()
                    eval_scalars = periodic_eval.run(engine)
                    if eval_scalars is not None:
                        logger.log(step, eval_scalars)
                        tqdm.write(f"eval @ step {step}: {PeriodicEval.summary(eval_scalars)} "
                                   f"({time.perf_counter() - t_eval:.1f} s)")
                    # Decoding time is not training time: keep it out of tokens/s and the data-wait fraction.
                    window["start"] += time.perf_counter() - t_eval
                if cfg.train.save_every and step % cfg.train.save_every == 0 and step < stop_at:
                    save_now()
            num_skipped += _report_epoch_data(feed, logger, position, per_rank // mbs, rank)
            if feed.ended and position.micro_in_epoch == 0:  # else max_steps would loop over empty epochs forever
                raise ValueError(f"epoch {epoch} gave no micro batch of {mbs} samples on some rank: of its "
                                 f"{per_rank} samples too many were skipped as corrupt (cache.skip_corrupt); "
                                 f"check the cache with `dspark cache verify`")
            if position.step >= stop_at:
                break
        else:
            finished = True
    finally:
        # Also on a non-finite loss: flush the logs, but save nothing.
        bar.close()
        logger.close()
    wall = time.perf_counter() - wall_start

    if saved_step != position.step:
        save_now()
    drafter_dir = run_dir / "drafter"
    if finished or position.step >= total_steps:
        # A drafter the deepspec layout cannot hold names its own exporter (Eagle3: the eagle3 layout).
        _save_final_drafter(engine, hf_config, drafter_dir, rank, getattr(drafter, "export_native", export_deepspec))
    dist_utils.barrier()
    return TrainResult(steps=position.step, final_loss=last_loss,
                       tokens_per_s=tokens_seen * world / max(wall, 1e-9), wall_s=wall, drafter_dir=drafter_dir,
                       checkpoint_dir=ckpt_dir, tensorboard_dir=run_dir / "tensorboard", num_skipped=num_skipped)


def _report_epoch_data(feed: EpochBatches, logger: MetricsLogger, position: checkpoint.Position,
                       planned_micro: int, rank: int) -> int:
    """Log (rank 0, once for all ranks) the corrupt samples skipped in this epoch and what the early end of the
    epoch left unused; returns the skipped count of all ranks. Collective: every rank calls it at the same point."""
    skipped, unused = feed.totals()
    if skipped and rank == 0:
        ended = (f"the epoch ended for every rank after {position.micro_in_epoch} of {planned_micro} micro batches, "
                 f"{unused} samples unused" if feed.ended else "the run stopped before the epoch's end")
        log.warning("epoch %d: %d corrupt cache samples skipped on all ranks together (cache.skip_corrupt); %s",
                    position.epoch, skipped, ended)
        logger.log(position.step, {"data/skipped_corrupt": skipped, "data/unused_samples": unused})
    return skipped


class PeriodicEval:
    """Speculative decoding of the drafter being trained on ``eval.num_prompts`` held-out prompts, at each of
    ``eval.temperatures`` (``dspark.eval.specdec.evaluate``): the true tau next to the analytic estimate.

    Which ranks decode: only rank 0, against the online target or one it loads on first use (``target.backend``
    hf: a target one process can host); every rank in lockstep where the online target is collective (zero3,
    megatron: each decoding forward needs all ranks), with the same prompts, seeds and weights. Training is left
    exactly as it was: the torch RNG is forked around it (the anchor generator is never touched), the drafter is
    restored to train mode, and the decoding cache it keeps is dropped.
    """

    def __init__(self, cfg: RunConfig, *, rank: int):
        from dspark.data.prompts import load_prompts

        self.cfg, self.rank, self.target = cfg, rank, None
        every, backend = cfg.train.eval_every, cfg.target.backend
        if backend == "pipeline" or (backend != "hf" and not cfg.train.online):
            raise ValueError(f"train.eval_every={every} decodes with the target, which target.backend={backend!r} "
                             f"cannot do here: it needs target.backend=hf (rank 0 hosts the whole target), or "
                             f"train.online=true with a backend that decodes (hf, zero3, megatron); or set "
                             f"train.eval_every=0")
        path = Path(cfg.run_dir) / "data" / "eval_prompts.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"train.eval_every={every} needs the held-out prompts at {path}, which is "
                                    f"missing: run `dspark prepare` with this config first, or set train.eval_every=0")
        self.prompts = load_prompts(str(path), cfg.eval.num_prompts)
        self.prompt_ids: list[list[int]] | None = None  # tokenised with the target's tokenizer once it is there

    def _decodes_here(self) -> bool:
        return self.rank == 0 or (self.target is not None and self.target.collective)

    def run(self, engine) -> dict[str, float] | None:
        """Evaluate ``engine.module`` now; every rank calls this at the same step. The scalars on rank 0, else None."""
        from contextlib import nullcontext

        module = engine.module
        device = torch.device(engine.device)
        scalars = None
        gather = nullcontext()
        if engine.zero_optimization_stage() == 3:
            from deepspeed.runtime.zero import unwrap_model_for_generation

            # Every rank enters (GatheredParameters is a collective), even those that do not decode. It also lifts
            # ZeRO-3's per-module hooks until it exits: with them, a forward on rank 0 alone would fetch (all-gather)
            # and release partitions and hang waiting for the other ranks.
            gather = unwrap_model_for_generation(engine)
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), gather:
            if self._decodes_here():
                was_training = module.training
                module.eval()
                try:
                    scalars = self._decode(module)
                finally:
                    module.train(was_training)
                    # Decoding caches the fused context keyed on the weights' storage; ZeRO-3 gathers may reuse
                    # that storage for other weights, and it holds memory: drop it.
                    module.__dict__.pop("_context_cache", None)
        dist_utils.barrier()
        return scalars if self.rank == 0 else None

    def _decode(self, drafter) -> dict[str, float]:
        import math

        from dspark.data.chat import prompt_ids
        from dspark.eval.specdec import evaluate
        from dspark.targets import load_target

        if self.target is None:  # lazily, inside the caller's forked RNG: loading may draw random numbers
            self.target = load_target(self.cfg.target, device=dist_utils.local_device())
        tokenizer = self.target.tokenizer
        if self.prompt_ids is None:
            self.prompt_ids = [prompt_ids(tokenizer, p) for p in self.prompts]
        ev = self.cfg.eval
        stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        scalars: dict[str, float] = {}
        for temperature in ev.temperatures:
            report = evaluate(self.target, drafter, self.prompt_ids, max_new_tokens=ev.max_new_tokens,
                              temperature=temperature, seed=ev.seed, stop_ids=stop_ids, batch_size=ev.batch_size,
                              group=(0, 1))  # this rank alone decodes every prompt
            tag = f"T{temperature:g}"
            scalars[f"eval/tau_{tag}"] = report.tau
            scalars[f"eval/mean_proposal_len_{tag}"] = report.mean_proposal_len
            for k, acc in enumerate(report.acceptance_K, start=1):
                if not math.isnan(acc):  # a position no round reached
                    scalars[f"eval/acceptance@{k}_{tag}"] = acc
        return scalars

    @staticmethod
    def summary(scalars: dict[str, float]) -> str:
        """One console line: tau and mean proposal length per temperature."""
        tags = [name.removeprefix("eval/tau_") for name in scalars if name.startswith("eval/tau_")]
        return ", ".join(f"{tag} tau {scalars[f'eval/tau_{tag}']:.3f} (proposal len "
                         f"{scalars[f'eval/mean_proposal_len_{tag}']:.2f})" for tag in tags)


def _train_micro_step(engine, batch, generator, world: int, step: int) -> tuple[float, dict]:
    """Forward + backward + (at the accumulation boundary) optimizer step on one micro batch."""
    out = engine(batch, generator)
    # Global normalisation: DeepSpeed averages gradients over ranks, so scale each rank's weighted sum by
    # world / (all-rank weight sum); the average is then sum over ranks / global weight sum.
    weight_sum = dist_utils.all_reduce_sum(out.weight_sum.detach().float().clone()).clamp_min(1e-6)
    loss = out.numerator.float() * world / weight_sum
    # Every rank must agree to stop, else the others would wait forever in the gradient all-reduce.
    (bad,) = dist_utils.all_reduce_ints([not torch.isfinite(loss).item()], op="max")
    if bad:
        raise NonFiniteLossError(f"non-finite loss ({loss.item()} on rank {dist_utils.rank()}) at step {step + 1}; "
                                 f"stopping without saving")
    engine.backward(loss)
    # ZeRO 1-3 record the global grad norm in their optimizer; ZeRO 0 clips without keeping it, so measure
    # it here, where the (already all-reduced) gradients are still on the parameters.
    own_norm = _param_grad_norm(engine) if engine.is_gradient_accumulation_boundary() else None
    engine.step()
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else own_norm
    terms = torch.stack([out.terms[k].detach().float() for k in sorted(out.terms)]) if out.terms else None
    accept = torch.stack([out.accept_sum_K.detach().float(), out.count_K.detach().float()])
    dist_utils.all_reduce_sum(accept)
    if terms is not None:
        dist_utils.all_reduce_sum(terms)
        terms = (terms / weight_sum).tolist()
    global_loss = loss.detach().clone() / world
    dist_utils.all_reduce_sum(global_loss)
    stats = {
        "terms": dict(zip(sorted(out.terms), terms)) if terms is not None else {},
        "accept_K": (accept[0] / accept[1].clamp_min(1)).tolist(),
        "tokens": int(out.num_tokens),
        "grad_norm": grad_norm,
    }
    return float(global_loss), stats


def _param_grad_norm(engine) -> float | None:
    grads = [p.grad for p in engine.module.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _save_final_drafter(engine, hf_config, out_dir: Path, rank: int, export_fn) -> None:
    """Write the trained drafter in the deepspec layout (gathering ZeRO-3 partitions first). A calibration.json
    left from calibrating earlier weights no longer fits these and is removed (`dspark calibrate` again)."""
    import deepspeed

    from dspark.eval.sts import CALIBRATION_FILE

    params = list(engine.module.parameters())
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params, enabled=zero3):
        if rank == 0:
            stale = Path(out_dir) / CALIBRATION_FILE
            if stale.is_file():
                log.warning("removing %s: it calibrated the drafter this run replaces", stale)
                stale.unlink()
            export_fn(engine.module, hf_config, out_dir)


def steps_for(num_samples: int, cfg: RunConfig, world: int) -> int:
    """Optimizer steps a run of ``cfg`` takes on ``num_samples`` cached samples."""
    return _plan_steps(num_samples, cfg, world)[2]

