"""Hosting the frozen target: one ``TargetBackend`` interface, backends chosen by ``target.backend``."""

from dspark.targets.base import TargetBackend, TargetFeatures, TargetIdentity

__all__ = ["TargetBackend", "TargetFeatures", "TargetIdentity", "load_target"]


def load_target(cfg, device: str = "cpu"):
    """Build the backend named by ``cfg.backend`` (a ``TargetConfig``)."""
    if cfg.backend == "hf":
        from dspark.targets.hf import HFTarget

        return HFTarget.from_config(cfg, device=device)
    raise ValueError(f"target.backend {cfg.backend!r} is not available; expected one of: hf")
