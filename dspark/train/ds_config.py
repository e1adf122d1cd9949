"""The DeepSpeed config of a run, derived from the run config by one function (never kept in sync by hand)."""

from __future__ import annotations

import json
from pathlib import Path

from dspark.config import ConfigError, TrainConfig

DS_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def _template(zero_stage: int) -> dict:
    path = DS_CONFIGS_DIR / f"zero{zero_stage}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        data.pop("_comment", None)
        return data
    # Installed without the repo checkout: the templates are small enough to rebuild.
    zero = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"zero_optimization": zero, "steps_per_print": 1000000, "wall_clock_breakdown": False}


def make_ds_config(train: TrainConfig, *, world_size: int, total_steps: int,
                   global_batch_size: int | None = None) -> dict:
    """Fill batch, precision, optimizer and LR-schedule fields from ``train``.

    ``global_batch_size``, when given, must equal micro batch x grad accumulation x world size; a contradiction
    is refused rather than silently resolved.
    """
    derived = train.micro_batch_size * train.grad_accum_steps * world_size
    if global_batch_size is not None and global_batch_size != derived:
        raise ConfigError(
            f"global batch {global_batch_size} != micro batch {train.micro_batch_size} x grad accumulation "
            f"{train.grad_accum_steps} x world size {world_size} = {derived}"
        )
    if total_steps < 1:
        raise ConfigError(f"the run has {total_steps} optimizer steps: too little data for the batch size")
    cfg = _template(train.zero_stage)
    warmup = max(1, round(train.warmup_ratio * total_steps)) if train.warmup_ratio > 0 else 0
    cfg.update(
        train_batch_size=derived,
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum_steps,
        gradient_clipping=train.grad_clip,
        bf16={"enabled": train.precision == "bf16"},
        fp16={"enabled": False},
        optimizer={
            "type": "AdamW",
            # torch_adam: DeepSpeed's fused CPU Adam needs a ~46 s compile; torch's AdamW does the same maths.
            "params": {"lr": train.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": train.weight_decay,
                       "torch_adam": True},
        },
        scheduler={
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": total_steps, "warmup_num_steps": warmup, "warmup_min_ratio": 0.0,
                       "cos_min_ratio": train.min_lr_ratio, "warmup_type": "linear"},
        },
    )
    return cfg
