"""Drafters: one folder per algorithm behind the ``Drafter`` interface, plus shared blocks.

``build_drafter`` makes a fresh drafter for a target; ``load_drafter`` rebuilds one from an export directory
(any format). Single-device torch only (no deepspeed / megatron / torch.distributed imports here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dspark.config import DrafterConfig
from dspark.drafters.base import Drafter, LossOutput, Proposal

__all__ = ["Drafter", "LossOutput", "Proposal", "build_drafter", "load_drafter"]


def build_drafter(cfg: DrafterConfig, target_config, layer_ids: list[int], embed_weight: torch.Tensor,
                  lm_head_weight: torch.Tensor) -> Drafter:
    """A freshly initialised drafter for ``cfg.algorithm`` around the target's frozen embedding and LM head.

    ``target_config`` is the target's HF config (object or dict); the drafter's layers take their dims from it.
    The frozen weights are referenced, not copied (pass clones if the target is freed or trained elsewhere).
    ``cfg.mask_token_id = -1`` resolves to ``vocab_size - 1`` (see ``resolve_mask_token_id``).
    """
    if cfg.algorithm in ("dspark", "dflash"):
        from dspark.drafters.dspark import DSparkDrafter

        return DSparkDrafter(cfg, target_config, layer_ids, embed_weight, lm_head_weight)
    if cfg.algorithm == "eagle3":
        from dspark.drafters.eagle3 import Eagle3Drafter

        return Eagle3Drafter(cfg, target_config, layer_ids, embed_weight, lm_head_weight)
    if cfg.algorithm == "dspark_v4":
        from dspark.drafters.v4 import DSparkV4Drafter

        return DSparkV4Drafter(cfg, target_config, layer_ids, embed_weight, lm_head_weight)
    raise ValueError(f"drafter.algorithm {cfg.algorithm!r} unknown; expected dspark, dflash, eagle3 or dspark_v4")


def load_drafter(export_dir: str | Path, apply_calibration: bool = True, verifier=None) -> Drafter:
    """Rebuild a drafter (weights included) from an export directory in any format dspark writes (deepspec,
    eagle3, speculators; recognised from its ``config.json`` by ``dspark.export.detect_format``).

    ``verifier`` (a target backend, ``(config, embed_VH, lm_head_VH)`` or a name) supplies the frozen embedding /
    LM head to formats that do not store them (speculators DSpark/DFlash); default: the verifier the export names.
    A ``calibration.json`` beside the weights (written by ``dspark calibrate``) sets the confidence head's per-slot
    temperatures unless ``apply_calibration`` is False; a malformed one, one of the wrong length, or one for a
    drafter without a confidence head is a ValueError.
    """
    from dspark.eval.sts import read_calibration
    from dspark.export import load_exported

    drafter = load_exported(export_dir, verifier=verifier)
    temperatures = read_calibration(export_dir, getattr(drafter, "block_size", None)) if apply_calibration else None
    if temperatures is not None:
        if not hasattr(drafter, "set_confidence_temperatures"):
            raise ValueError(f"{Path(export_dir) / 'calibration.json'}: drafter {drafter.algorithm} has no "
                             "confidence head to calibrate")
        drafter.set_confidence_temperatures(temperatures)
    return drafter
