"""The DeepSpeed config of a run, derived from the run config by one function (never kept in sync by hand).

``make_ds_config`` is the only place that turns ``train.*`` into DeepSpeed's batch, precision, ZeRO, optimizer
and LR-schedule fields. The templates in ``ds_configs/`` (``zero{0,1,2,3}.json``, ``zero3_offload.json``) hold
only what the recipe does not say (ZeRO knobs, logging); a template that sets a derived field, or whose stage
disagrees with the file name, is refused. Contradictions in the recipe are refused with the fields named, not
resolved silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from dspark.config import ConfigError, Precision, TrainConfig, choices

DS_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = choices(Precision)
ACCELERATORS = ("cpu", "cuda")
# Fields only make_ds_config may set: a template that sets one would silently disagree with the recipe.
DERIVED_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


def template_path(zero_stage: int, offload_optimizer: bool = False) -> Path:
    """The template for a stage: ``zero3_offload.json`` for stage 3 with offload, else ``zero{stage}.json``
    (stages 1 and 2 take their offload block from ``make_ds_config``: it is a single device field there)."""
    name = "zero3_offload.json" if (zero_stage == 3 and offload_optimizer) else f"zero{zero_stage}.json"
    return DS_CONFIGS_DIR / name


def _template(zero_stage: int, offload_optimizer: bool) -> tuple[dict, str]:
    """(template dict, where it came from) for the stage; checked against the request."""
    path = template_path(zero_stage, offload_optimizer)
    if not path.is_file():
        # Installed without the repo checkout: the templates are small enough to rebuild.
        zero: dict = {"stage": zero_stage}
        if zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        return {"zero_optimization": zero, "steps_per_print": 1000000, "wall_clock_breakdown": False}, "built-in"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed template {path} is not valid JSON: {exc}") from None
    data.pop("_comment", None)
    derived = [k for k in DERIVED_FIELDS if k in data]
    if derived:
        raise ConfigError(f"DeepSpeed template {path} sets {', '.join(derived)}: these are derived from the run "
                          f"config (train.*) by make_ds_config; remove them from the template")
    stage = data.get("zero_optimization", {}).get("stage")
    if stage != zero_stage:
        raise ConfigError(f"DeepSpeed template {path} has zero_optimization.stage {stage} but train.zero_stage "
                          f"is {zero_stage}")
    return data, str(path)


def detect_accelerator() -> str:
    """'cuda' when torch sees a GPU, else 'cpu' (the same rule as ``dspark.distributed``: nccl vs gloo)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_train_config(train: TrainConfig, *, world_size: int, accelerator: str) -> int:
    """Refuse contradictory batch / precision / ZeRO settings; returns the global batch size."""
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"accelerator {accelerator!r} unknown; expected one of: {', '.join(ACCELERATORS)}")
    if train.zero_stage not in ZERO_STAGES:
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {train.zero_stage}")
    if train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {train.precision!r}")
    if train.precision == "fp16" and accelerator == "cpu":
        raise ConfigError("train.precision fp16 is not supported by DeepSpeed on CPU; use bf16 or fp32")
    if train.offload_optimizer and train.zero_stage == 0:
        # DeepSpeed would accept the block and ignore it: ZeRO 0 has no partitioned optimizer to move.
        raise ConfigError("train.offload_optimizer=true needs train.zero_stage 1, 2 or 3 (got 0): ZeRO 0 keeps "
                          "the plain optimizer and DeepSpeed would silently ignore the offload")
    for name in ("micro_batch_size", "grad_accum_steps"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(train, name)}")
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if train.grad_clip < 0:
        raise ConfigError(f"train.grad_clip must be >= 0 (0 = no clipping), got {train.grad_clip}")
    derived = train.micro_batch_size * train.grad_accum_steps * world_size
    if train.global_batch_size < 0:
        raise ConfigError(f"train.global_batch_size must be >= 0 (0 = derived), got {train.global_batch_size}")
    if train.global_batch_size and train.global_batch_size != derived:
        raise ConfigError(
            f"train.global_batch_size {train.global_batch_size} != train.micro_batch_size {train.micro_batch_size}"
            f" x train.grad_accum_steps {train.grad_accum_steps} x world size {world_size} = {derived}; set "
            f"train.global_batch_size=0 to derive it, or change one of the factors"
        )
    return derived


def _precision_fields(precision: str) -> dict:
    # fp16 needs dynamic loss scaling (loss_scale 0); bf16 and fp32 need none.
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} if precision == "fp16" else {"enabled": False}
    return {"bf16": {"enabled": precision == "bf16"}, "fp16": fp16}


def _optimizer(train: TrainConfig, accelerator: str) -> dict:
    params = {"lr": train.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": train.weight_decay}
    # torch_adam = torch's AdamW (same maths). DeepSpeed's own Adams are C++/CUDA ops compiled on first use
    # (fused_adam ~46 s; cpu_adam 2-4 min on 2 cores, cached in $TORCH_EXTENSIONS_DIR). The compiled CPU Adam
    # only pays off when the optimizer is offloaded from a GPU; on a CPU-only run the states are in CPU memory
    # either way, so torch's AdamW is used there too.
    if not (train.offload_optimizer and accelerator == "cuda"):
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def make_ds_config(train: TrainConfig, *, world_size: int, total_steps: int, accelerator: str | None = None) -> dict:
    """The DeepSpeed config dict of a run: batch, precision, ZeRO stage (+ optimizer offload), optimizer and
    LR schedule, all derived from ``train``; contradictions raise ``ConfigError`` naming the fields.

    ``accelerator`` is 'cpu' or 'cuda' (None = detect): fp16 is refused on CPU, and the optimizer differs
    with offload on a GPU (see ``_optimizer``).
    """
    accelerator = accelerator or detect_accelerator()
    global_batch = check_train_config(train, world_size=world_size, accelerator=accelerator)
    if total_steps < 1:
        raise ConfigError(f"the run has {total_steps} optimizer steps: too little data for the batch size")
    cfg, source = _template(train.zero_stage, train.offload_optimizer)
    zero = dict(cfg.get("zero_optimization", {}))
    if train.offload_optimizer:
        offload = dict(zero.get("offload_optimizer") or {"device": "cpu"})
        if offload.get("device") != "cpu":
            raise ConfigError(f"DeepSpeed template {source}: offload_optimizer.device is "
                              f"{offload.get('device')!r}, expected 'cpu' for train.offload_optimizer=true")
        # Pinned host memory speeds up GPU<->CPU copies; without a GPU there is nothing to pin for.
        offload["pin_memory"] = accelerator == "cuda"
        zero["offload_optimizer"] = offload
    elif "offload_optimizer" in zero:
        raise ConfigError(f"DeepSpeed template {source} offloads the optimizer but train.offload_optimizer is "
                          f"false")
    # DeepSpeed's WarmupCosineLR refuses 0 warmup steps: "no warmup" is one warmup step that starts at the full LR.
    warmup = max(1, round(train.warmup_ratio * total_steps))
    warmup_min_ratio = 0.0 if train.warmup_ratio > 0 else 1.0
    cfg.update(
        zero_optimization=zero,
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum_steps,
        gradient_clipping=train.grad_clip,
        optimizer=_optimizer(train, accelerator),
        scheduler={
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": total_steps, "warmup_num_steps": warmup,
                       "warmup_min_ratio": warmup_min_ratio,
                       "cos_min_ratio": train.min_lr_ratio, "warmup_type": "linear"},
        },
        **_precision_fields(train.precision),
    )
    return cfg
