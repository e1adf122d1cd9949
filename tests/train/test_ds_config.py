"""make_ds_config: every batch, precision, ZeRO and optimizer field derived from the recipe; contradictions refused."""

import json

import pytest

from dspark.config import ConfigError, TrainConfig
from dspark.train import ds_config
from dspark.train.ds_config import make_ds_config


def _make(accelerator="cpu", world_size=2, total_steps=10, **train):
    return make_ds_config(TrainConfig(**train), world_size=world_size, total_steps=total_steps,
                          accelerator=accelerator)


def test_fields_are_derived_from_the_recipe():
    cfg = _make(micro_batch_size=3, grad_accum_steps=2, precision="bf16", grad_clip=0.5, lr=1e-3, weight_decay=0.1,
                warmup_ratio=0.2, min_lr_ratio=0.1, zero_stage=2)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == \
        (12, 3, 2)
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"] == {"stage": 2}
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                            "weight_decay": 0.1, "torch_adam": True}}
    assert cfg["scheduler"]["params"] == {"total_num_steps": 10, "warmup_num_steps": 2, "warmup_min_ratio": 0.0,
                                          "cos_min_ratio": 0.1, "warmup_type": "linear"}
    # DeepSpeed refuses 0 warmup steps: no warmup = one warmup step that already starts at the full LR.
    no_warmup = _make(warmup_ratio=0.0)["scheduler"]["params"]
    assert (no_warmup["warmup_num_steps"], no_warmup["warmup_min_ratio"]) == (1, 1.0)
    # An explicit global batch that agrees is accepted and changes nothing.
    assert _make(micro_batch_size=3, grad_accum_steps=2, global_batch_size=12)["train_batch_size"] == 12


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_stage_has_a_template(stage):
    cfg = _make(zero_stage=stage)
    assert cfg["zero_optimization"]["stage"] == stage and "offload_optimizer" not in cfg["zero_optimization"]
    assert cfg["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    assert "_comment" not in cfg


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_puts_the_optimizer_on_the_cpu(stage):
    cpu = _make(zero_stage=stage, offload_optimizer=True)
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # no 2-4 min cpu_adam build on a CPU-only run
    gpu = _make("cuda", zero_stage=stage, offload_optimizer=True)
    assert gpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "torch_adam" not in gpu["optimizer"]["params"]  # DeepSpeedCPUAdam: the reason to offload from a GPU
    assert _make("cuda", zero_stage=stage)["optimizer"]["params"]["torch_adam"] is True
    if stage == 3:
        assert ds_config.template_path(3, True).name == "zero3_offload.json"
        assert cpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_fp16_is_refused_on_cpu_and_scaled_on_gpu():
    with pytest.raises(ConfigError, match="train.precision fp16 is not supported by DeepSpeed on CPU"):
        _make(precision="fp16")
    assert _make("cuda", precision="fp16")["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}


@pytest.mark.parametrize("train, pattern", [
    ({"global_batch_size": 16, "micro_batch_size": 4, "grad_accum_steps": 1},
     r"train.global_batch_size 16 != train.micro_batch_size 4 x train.grad_accum_steps 1 x world size 2 = 8"),
    ({"offload_optimizer": True, "zero_stage": 0}, r"train.offload_optimizer=true needs train.zero_stage 1, 2 or 3"),
    ({"zero_stage": 4}, r"train.zero_stage must be 0, 1, 2 or 3, got 4"),
    ({"precision": "fp8"}, r"train.precision must be one of fp32, bf16, fp16, got 'fp8'"),
    ({"micro_batch_size": 0}, r"train.micro_batch_size must be >= 1, got 0"),
    ({"grad_accum_steps": 0}, r"train.grad_accum_steps must be >= 1, got 0"),
    ({"global_batch_size": -1}, r"train.global_batch_size must be >= 0"),
    ({"grad_clip": -1.0}, r"train.grad_clip must be >= 0"),
])
def test_contradictions_are_refused(train, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _make(**train)


def test_bad_run_shape_is_refused():
    with pytest.raises(ConfigError, match="accelerator 'tpu' unknown"):
        _make("tpu")
    with pytest.raises(ConfigError, match="world size must be >= 1, got 0"):
        _make(world_size=0)
    with pytest.raises(ConfigError, match="the run has 0 optimizer steps"):
        _make(total_steps=0)


def test_templates_may_not_set_derived_fields_or_disagree(tmp_path, monkeypatch):
    monkeypatch.setattr(ds_config, "DS_CONFIGS_DIR", tmp_path)
    (tmp_path / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 64}))
    with pytest.raises(ConfigError, match=r"zero2.json sets train_batch_size: these are derived from the run config"):
        _make(zero_stage=2)
    (tmp_path / "zero1.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"zero1.json has zero_optimization.stage 2 but train.zero_stage is 1"):
        _make(zero_stage=1)
    (tmp_path / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3,
                                                                           "offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match=r"zero3.json offloads the optimizer but train.offload_optimizer is false"):
        _make(zero_stage=3)
    (tmp_path / "zero3_offload.json").write_text(json.dumps({"zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "nvme"}}}))
    with pytest.raises(ConfigError, match=r"offload_optimizer.device is 'nvme', expected 'cpu'"):
        _make(zero_stage=3, offload_optimizer=True)
    (tmp_path / "zero0.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"zero0.json is not valid JSON"):
        _make(zero_stage=0)


def test_recipe_fields_parse_from_overrides(tmp_path):
    from dspark.config import load_config

    cfg = load_config("tiny_llama_dspark", ["train.zero_stage=3", "train.offload_optimizer=true",
                                            "train.global_batch_size=8", "train.micro_batch_size=4"])
    assert (cfg.train.zero_stage, cfg.train.offload_optimizer, cfg.train.global_batch_size) == (3, True, 8)
    ds = make_ds_config(cfg.train, world_size=2, total_steps=5, accelerator="cpu")
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
