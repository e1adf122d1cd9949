"""What the trainer applies to a drafter from outside before training (the model code stays single-device).

- ``drafter.init_from_target=true``: a drafter with ``init_from_target(model_dir)`` (DeepSeek-V4's mtp.* draft)
  copies its stages from the target's own layers; every rank reads the same tensors, so replicas start equal.
- Aux-loss-free MoE balancing across data ranks: a drafter with a ``reduce_expert_counts`` hook gets an all-reduce
  (sum) of its routers' expert loads, so every rank moves the selection biases by the same step.
- ``train.expert_parallel > 1``: the routed experts are split over expert-parallel groups
  (``dspark.train.expert_parallel``), after init from target so each rank keeps its slice of the copied experts.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def prepare_drafter(drafter, cfg, world: int) -> None:
    """Apply ``cfg``'s drafter options that need the run (the target's path, the process group)."""
    if cfg.drafter.init_from_target:
        if not hasattr(drafter, "init_from_target"):
            raise ValueError(f"drafter.init_from_target is set, but drafter {drafter.algorithm!r} has no target layers "
                             "to copy; expected algorithm dspark_v4")
        from dspark.targets.source import resolve_target_source

        source, gguf_file, _ = resolve_target_source(cfg.target.name_or_path)
        if gguf_file is not None:
            raise ValueError(f"drafter.init_from_target reads safetensors; target {cfg.target.name_or_path} is a GGUF")
        copied = drafter.init_from_target(source)
        log.info("drafter.init_from_target: %d tensors copied from %s layers %s", len(copied), source,
                 cfg.target.layer_ids)
    if hasattr(drafter, "reduce_expert_counts") and world > 1:
        import torch.distributed as dist

        def all_ranks_sum(counts):
            counts = counts.clone()
            dist.all_reduce(counts)
            return counts

        drafter.reduce_expert_counts = all_ranks_sum
    if cfg.train.expert_parallel > 1:
        from dspark.train.expert_parallel import apply_expert_parallel

        moes = apply_expert_parallel(drafter, cfg.train.expert_parallel, world)
        log.info("train.expert_parallel=%d: routed experts of %d MoEs split", cfg.train.expert_parallel, moes)
