"""Periodic evaluation during training (``train.eval_every``): the drafter being trained decodes held-out prompts
against the target by real speculative decoding, next to the training loss's analytic tau estimate."""

from __future__ import annotations

import time

import torch

from dspark import distributed as dist_utils
from dspark.config import RunConfig
from dspark.paths import RunPaths


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
        path = RunPaths.of(cfg).eval_prompts
        if not path.is_file():
            raise FileNotFoundError(f"train.eval_every={every} needs the held-out prompts at {path}, which is "
                                    f"missing: run `dspark prepare` with this config first, or set train.eval_every=0")
        self.prompts = load_prompts(str(path), cfg.eval.num_prompts)
        self.prompt_ids: list[list[int]] | None = None  # tokenised with the target's tokenizer once it is there

    def after_step(self, step: int, engine, logger) -> float:
        """At every ``train.eval_every``-th step: evaluate, log ``eval/*`` at ``step`` and print a console line.
        Returns the seconds spent, which are not training time. Collective, like ``run``."""
        if step % self.cfg.train.eval_every:
            return 0.0
        from tqdm import tqdm

        start = time.perf_counter()
        scalars = self.run(engine)
        if scalars is not None:
            logger.log(step, scalars)
            tqdm.write(f"eval @ step {step}: {self.summary(scalars)} ({time.perf_counter() - start:.1f} s)")
        return time.perf_counter() - start

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
                    module.reset_context_cache()
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
