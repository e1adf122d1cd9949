"""What the trainer applies to a drafter from outside before training (the model code stays single-device).

- ``drafter.v4.init_from_target=true``: ``Drafter.init_from_target(model_dir)`` (DeepSeek-V4's mtp.* draft) copies
  the draft stages from the target's own layers; every rank reads the same tensors, so replicas start equal.
- Aux-loss-free MoE balancing across data ranks: with several ranks ``Drafter.reduce_expert_counts`` becomes an
  all-reduce (sum), so every rank moves the routers' selection biases by the same step.
- ``train.zero_stage=3``: the parameters the drafter's forward uses outside their own module
  (``Drafter.external_parameters``, e.g. the Markov W2 handed to the fused loss) are registered with ZeRO-3, which
  then gathers them for the whole drafter forward and backward as it does a module's own weights.
- ``train.expert_parallel > 1``: the routed experts are split over expert-parallel groups
  (``dspark.train.expert_parallel``), after init from target so each rank keeps its slice of the copied experts.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def prepare_drafter(drafter, cfg, world: int) -> None:
    """Apply ``cfg``'s drafter options that need the run (the target's path, the process group, ZeRO-3)."""
    if cfg.drafter.v4.init_from_target:
        from dspark.targets.source import resolve_target_source

        source, gguf_file, _ = resolve_target_source(cfg.target.name_or_path)
        if gguf_file is not None:
            raise ValueError(f"drafter.v4.init_from_target reads safetensors; target {cfg.target.name_or_path} is a "
                             "GGUF")
        copied = drafter.init_from_target(source)
        log.info("drafter.v4.init_from_target: %d tensors copied from %s layers %s", len(copied), source,
                 cfg.target.layer_ids)
    if world > 1:
        import torch.distributed as dist

        def all_ranks_sum(counts):
            counts = counts.clone()
            dist.all_reduce(counts)
            return counts

        drafter.reduce_expert_counts = all_ranks_sum
    if cfg.train.zero_stage == 3:
        from deepspeed.runtime.zero import register_external_parameter

        for param in drafter.external_parameters():
            register_external_parameter(drafter, param)
    if cfg.train.expert_parallel > 1:
        from dspark.train.expert_parallel import apply_expert_parallel

        moes = apply_expert_parallel(drafter, cfg.train.expert_parallel, world)
        log.info("train.expert_parallel=%d: routed experts of %d MoEs split", cfg.train.expert_parallel, moes)
