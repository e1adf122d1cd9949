"""Hosting the frozen target: one ``TargetBackend`` interface, backends chosen by ``target.backend``."""

from dspark.targets.base import TargetBackend, TargetFeatures, TargetIdentity

__all__ = ["TargetBackend", "TargetFeatures", "TargetIdentity", "load_target"]


def load_target(cfg, device: str = "cpu"):
    """Build the backend named by ``cfg.backend`` (a ``TargetConfig``), after checking a local target's family
    against ``cfg.family`` (a hub id or GGUF is checked once loaded)."""
    family = getattr(cfg, "family", "")
    if family:
        _check_family_early(cfg)
    target = _build(cfg, device)
    if family:
        from dspark.targets.families import require_recipe_family

        require_recipe_family(family, target.config.model_type, cfg.name_or_path)
    return target


def _check_family_early(cfg) -> None:
    """Refuse a local target of the wrong family from its config.json, before any weight is read."""
    import json
    from pathlib import Path

    from dspark.targets.families import require_recipe_family
    from dspark.targets.source import resolve_target_source

    source, gguf_file, _ = resolve_target_source(cfg.name_or_path)
    config_path = Path(source) / "config.json"
    if gguf_file is None and config_path.is_file():
        require_recipe_family(cfg.family, json.loads(config_path.read_text()).get("model_type"), cfg.name_or_path)


def _build(cfg, device: str):
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
