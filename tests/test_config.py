import json

import pytest

from dspark.config import ConfigError, RunConfig, config_from_dict, list_recipes, load_config


def test_shipped_recipes_load_and_resolve():
    assert {"smollm2_dspark", "tiny_llama_dspark"} <= set(list_recipes())
    for name in list_recipes():
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
        assert cfg.drafter.loss_decay == 4.0  # the reference code's decay, not gamma


def test_overrides_are_typed():
    cfg = load_config("smollm2_dspark", ["train.lr=1e-3", "target.layer_ids=[0, 5]", "run_dir=/tmp/x",
                                         "drafter.enable_confidence_head=false", "eval.temperatures=[0]"])
    assert cfg.train.lr == 1e-3
    assert cfg.target.layer_ids == [0, 5]
    assert cfg.run_dir == "/tmp/x"
    assert cfg.drafter.enable_confidence_head is False
    assert cfg.eval.temperatures == [0.0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nope=1", "unknown config key 'train.nope'; valid keys under 'train': .*grad_clip"),
        ("bogus=1", "unknown config key 'bogus'; valid keys under '<top>': cache, data"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.zero_stage=1.5", "train.zero_stage: expected an integer"),
        ("target.layer_ids=[3, 2]", "strictly increasing"),
        ("train.precision=fp8", "train.precision must be fp32, bf16 or fp16"),
        ("train.offload_optimizer=true", "offload_optimizer needs train.zero_stage 1, 2 or 3"),
        ("train.lr", "not of the form key.path=value"),
        ("train.keep_last=0", "train.keep_last >= 1"),
        ("train.lr.x=1", "is not a section"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smollm2_dspark", [override])


def test_recipe_files_yaml_and_python(tmp_path):
    (tmp_path / "r.yaml").write_text("target: {name_or_path: x, layer_ids: [0]}\ndrafter: {typo: 1}\n")
    with pytest.raises(ConfigError, match="unknown config key drafter.typo; valid keys under 'drafter'"):
        load_config(str(tmp_path / "r.yaml"))
    (tmp_path / "r.py").write_text("RECIPE = {'target': {'name_or_path': 'x', 'layer_ids': [0, 1]}}\n")
    assert load_config(str(tmp_path / "r.py")).target.layer_ids == [0, 1]
    (tmp_path / "missing.yaml").write_text("data: {}\n")
    with pytest.raises(ConfigError, match="missing required config key target"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="recipe 'no_such_recipe' not found"):
        load_config("no_such_recipe")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny_llama_dspark", ["train.lr=2e-4"])
    cfg.save(tmp_path / "config.json")
    again = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert again == cfg
