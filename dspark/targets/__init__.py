"""Hosting the frozen target: one ``TargetBackend`` interface, backends chosen by ``target.backend``."""

from dspark.targets.base import TargetBackend, TargetFeatures, TargetIdentity

__all__ = ["TargetBackend", "TargetFeatures", "TargetIdentity", "load_target"]


def load_target(cfg, device: str = "cpu"):
    """Build the backend named by ``cfg.backend`` (a ``TargetConfig``)."""
    if cfg.backend == "hf":
        from dspark.targets.hf import HFTarget

        return HFTarget.from_config(cfg, device=device)
    if cfg.backend == "zero3":
        from dspark.targets.zero3 import ZeRO3Target

        return ZeRO3Target.from_config(cfg, device=device)
    if cfg.backend == "megatron":
        from dspark.targets.megatron import MegatronTarget

        return MegatronTarget.from_config(cfg, device=device)
    if cfg.backend == "pipeline":
        from dspark.targets.pipeline import PipelineTarget

        return PipelineTarget.from_config(cfg, device=device)
    raise ValueError(f"target.backend {cfg.backend!r} is not available; expected one of: hf, zero3, megatron, pipeline")
