"""Drafters: one folder per algorithm behind the ``Drafter`` interface, plus shared blocks.

``build_drafter`` makes a fresh drafter for a target (``dspark.export.load_drafter`` rebuilds one from an export
directory). Single-device torch only (no deepspeed / megatron / torch.distributed imports here).
"""

from __future__ import annotations

import torch

from dspark.config import DrafterConfig
from dspark.drafters.base import Drafter, LossOutput, Proposal

__all__ = ["Drafter", "LossOutput", "Proposal", "build_drafter"]


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
