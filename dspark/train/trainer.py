"""The training loop: one function over a step function, the same for every drafter algorithm.

The drafter supplies its loss (``Drafter.forward_loss``); the trainer only normalises it globally, steps the
DeepSpeed engine, and logs. Samples come from a ``SampleSource`` (``dspark.train.sources``): the cache, or the
target running in this job (``train.online``); the trainer never knows which, nor which algorithm it trains.
With ``train.eval_every`` it also measures the drafter being trained by real speculative decoding (``PeriodicEval``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark import distributed as dist_utils
from dspark.config import RunConfig
from dspark.paths import RunPaths
from dspark.train import checkpoint
from dspark.train.checkpoint import Checkpointer
from dspark.train.metrics import MetricsLogger, MetricsWindow
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

    The resolved config is written to ``<run_dir>/config.json`` only once the target, the data and any checkpoint
    to resume were accepted: a refused run leaves the previous run's record as it was.
    """
    from tqdm import tqdm

    from dspark.eval.periodic import PeriodicEval

    rank, world = dist_utils.init_distributed()
    paths = RunPaths.of(cfg)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    # Checked before anything loads, so a misconfigured eval fails at once rather than after eval_every steps.
    periodic_eval = PeriodicEval(cfg, rank=rank) if cfg.train.eval_every else None
    conversations_path = Path(conversations_path or paths.train_data)
    source, frozen = open_source(cfg, cache_dir=Path(cache_dir or paths.cache), conversations_path=conversations_path,
                                 device=dist_utils.local_device())
    if periodic_eval is not None and cfg.train.online:
        periodic_eval.target = source.target  # online: the target this job already hosts
    per_rank, _, total_steps = _plan_steps(len(source), cfg, world)
    engine, generator = _build_engine(cfg, frozen, conversations_path, total_steps, rank=rank, world=world)
    checkpointer = Checkpointer(engine, paths.checkpoints, generator, cfg.train, cfg.drafter, rank=rank, world=world)
    position = checkpointer.resume()
    if rank == 0:
        cfg.save(paths.config)
    stop_at = min(total_steps, stop_after_steps) if stop_after_steps is not None else total_steps

    logger = MetricsLogger(paths.tensorboard, enabled=rank == 0)
    window = MetricsWindow(world)
    feed = RunBatches(source, cfg, position, rank=rank, world=world, per_rank=per_rank, device=engine.device,
                      logger=logger)
    bar = tqdm(total=total_steps, initial=position.step, desc="train", unit="step",
               disable=not (progress and rank == 0))
    last_loss, wall_start = float("nan"), time.perf_counter()
    try:
        while position.step < stop_at:
            done = train_step(engine, feed, generator, window, cfg.train.grad_accum_steps, position.step)
            if done is None:
                break  # every epoch is done (fewer steps than planned when samples were skipped)
            last_loss, stats = done
            position.step += 1
            bar.update(1)
            if position.step % cfg.train.log_every == 0 or position.step == total_steps:
                scalars = window.close(last_loss, stats, engine.get_lr()[0])
                logger.log(position.step, scalars)
                bar.set_postfix(loss=f"{last_loss:.3f}", tau=f"{scalars['tau_estimate']:.2f}")
            if periodic_eval is not None:
                window.exclude(periodic_eval.after_step(position.step, engine, logger))
            checkpointer.after_step(position, feed.stream_position, stop_at)
        feed.end_epoch()
    finally:
        # Also on a non-finite loss: flush the logs, but save nothing.
        bar.close()
        logger.close()
    wall = time.perf_counter() - wall_start

    checkpointer.finish(position, feed.stream_position)
    if feed.exhausted or position.step >= total_steps:
        # A drafter the deepspec layout cannot hold names its own exporter (Eagle3: the eagle3 layout).
        _save_final_drafter(engine, frozen.hf_config, paths.drafter, rank)
    dist_utils.barrier()
    return TrainResult(steps=position.step, final_loss=last_loss,
                       tokens_per_s=window.total_tokens * world / max(wall, 1e-9), wall_s=wall,
                       drafter_dir=paths.drafter, checkpoint_dir=paths.checkpoints, tensorboard_dir=paths.tensorboard,
                       num_skipped=feed.num_skipped)


def train_step(engine, feed: RunBatches, generator: torch.Generator, window: MetricsWindow, grad_accum: int,
               step: int) -> tuple[float, dict] | None:
    """One optimizer step: forward and backward over one accumulation group of ``grad_accum`` micro batches (it may
    cross an epoch boundary), DeepSpeed stepping the optimizer at the last one. Returns the global loss and the
    statistics of that last micro batch, or None when the data ran out first (the partial group is dropped)."""
    for _ in range(grad_accum):
        read_before = feed.read_s
        batch = feed.next_batch()
        if batch is None:
            return None
        loss, stats = _train_micro_step(engine, batch, generator, feed.world, step)
        window.add(stats["tokens"], feed.read_s - read_before)
    return loss, stats


def _build_engine(cfg: RunConfig, frozen, conversations_path: Path, total_steps: int, *, rank: int,
                  world: int) -> tuple[object, torch.Generator]:
    """The drafter (seeded by ``train.seed``) inside a DeepSpeed engine, and this rank's anchor-sampling generator."""
    import deepspeed

    from dspark.drafters import build_drafter
    from dspark.train.drafter_hooks import prepare_drafter
    from dspark.train.ds_config import make_ds_config

    torch.manual_seed(cfg.train.seed)
    drafter = build_drafter(cfg.drafter, frozen.hf_config, cfg.target.layer_ids, frozen.embed_VH, frozen.lm_head_VH)
    if drafter.needs_token_counts:  # a pruned draft vocab (Eagle3): the most frequent tokens
        from dspark.data.regenerate import read_conversations

        drafter.fit_draft_vocab(read_conversations(conversations_path))
    prepare_drafter(drafter, cfg, world)  # options applied from outside the model (init from target, MoE load sums)
    ds_config = make_ds_config(cfg.train, world_size=world, total_steps=total_steps)
    engine, _, _, _ = deepspeed.initialize(model=drafter, model_parameters=drafter.trainable_parameters(),
                                           config=ds_config)
    # Anchor sampling differs per rank (different data) but is reproducible for a given (seed, rank).
    return engine, torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)


class RunBatches:
    """This rank's micro batches from ``position`` on, across epochs: one ``EpochBatches`` an epoch, on the
    device and in the training precision. It keeps ``position``'s epoch and micro batch count current and, at each
    epoch's end, reports the corrupt samples skipped (``end_epoch``). Collective, like ``EpochBatches``.

    ``train.max_steps`` runs epochs until the step budget is spent; otherwise ``train.num_epochs`` of them.
    """

    def __init__(self, source, cfg: RunConfig, position: checkpoint.Position, *, rank: int, world: int,
                 per_rank: int, device, logger: MetricsLogger):
        self.source, self.cfg, self.position, self.device, self.logger = source, cfg, position, device, logger
        self.rank, self.world, self.per_rank = rank, world, per_rank
        self.num_epochs = cfg.train.num_epochs if not cfg.train.max_steps else 10**9
        self.mbs = cfg.train.micro_batch_size
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
        self.epoch: EpochBatches | None = None
        self.reported = False  # the current epoch's data was reported (it ended, or the run stopped in it)
        self.exhausted = False  # every epoch done
        self.num_skipped = 0  # corrupt samples skipped on all ranks, over this run's epochs
        self.read_s = 0.0  # seconds spent reading and collating (not waiting for the other ranks)

    @property
    def stream_position(self) -> int | None:
        """Samples of this rank's stream consumed in the current epoch; None before the first batch was asked for."""
        return self.epoch.position if self.epoch is not None else None

    def next_batch(self) -> dict | None:
        """The next micro batch, or None (on every rank at once) when the last epoch is over."""
        while not self.exhausted:
            if self.epoch is None:
                self._open_epoch()
            read_before = self.epoch.read_s
            batch = self.epoch.next_batch()
            self.read_s += self.epoch.read_s - read_before
            if batch is not None:
                self.position.micro_in_epoch += 1
                return {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                        for k, v in batch.items()}
            self.end_epoch()
            if self.position.epoch + 1 >= self.num_epochs:
                self.exhausted = True
            else:
                self.position.epoch, self.position.micro_in_epoch, self.position.stream_positions = \
                    self.position.epoch + 1, 0, None
                self.epoch = None
        return None

    def _open_epoch(self) -> None:
        position = self.position
        start = (position.stream_positions[self.rank] if position.stream_positions
                 else position.micro_in_epoch * self.mbs)
        self.epoch = EpochBatches(self.source, seed=self.cfg.train.seed, epoch=position.epoch, rank=self.rank,
                                  world_size=self.world, per_rank=self.per_rank, micro_batch_size=self.mbs,
                                  max_seq_len=self.cfg.data.max_seq_len, start=start)
        self.reported = False

    def end_epoch(self) -> None:
        """Log (rank 0, once for all ranks) the corrupt samples skipped in the current epoch and what its early end
        left unused; refuse an epoch that gave no batch. Collective: every rank calls it at the same point."""
        if self.epoch is None or self.reported:
            return
        self.reported = True
        skipped, unused = self.epoch.totals()
        self.num_skipped += skipped
        if skipped and self.rank == 0:
            ended = (f"the epoch ended for every rank after {self.position.micro_in_epoch} of "
                     f"{self.per_rank // self.mbs} micro batches, {unused} samples unused" if self.epoch.ended
                     else "the run stopped before the epoch's end")
            log.warning("epoch %d: %d corrupt cache samples skipped on all ranks together (cache.skip_corrupt); %s",
                        self.position.epoch, skipped, ended)
            self.logger.log(self.position.step, {"data/skipped_corrupt": skipped, "data/unused_samples": unused})
        if self.epoch.ended and self.position.micro_in_epoch == 0:  # else max_steps would loop over empty epochs
            raise ValueError(f"epoch {self.position.epoch} gave no micro batch of {self.mbs} samples on some rank: of "
                             f"its {self.per_rank} samples too many were skipped as corrupt (cache.skip_corrupt); "
                             f"check the cache with `dspark cache verify`")


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


def _save_final_drafter(engine, hf_config, out_dir: Path, rank: int) -> None:
    """Write the trained drafter in its algorithm's own layout (``dspark.export.NATIVE_FORMATS``), gathering ZeRO-3
    partitions first. A calibration.json left from calibrating
    earlier weights no longer fits these and is removed (`dspark calibrate` again)."""
    import deepspeed

    from dspark.eval.sts import CALIBRATION_FILE
    from dspark.export import export_native

    if engine.has_moe_layers:  # expert-parallel drafter: every rank gathers the full experts (collective)
        from dspark.train.expert_parallel import gather_experts

        gather_experts(engine.module)
    params = list(engine.module.parameters())
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params, enabled=zero3):
        if rank == 0:
            stale = Path(out_dir) / CALIBRATION_FILE
            if stale.is_file():
                log.warning("removing %s: it calibrated the drafter this run replaces", stale)
                stale.unlink()
            export_native(engine.module, hf_config, out_dir)
