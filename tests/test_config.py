import json

import pytest

from dspark.config import RANGES, ConfigError, RunConfig, config_from_dict, list_recipes, load_config


def test_shipped_recipes_load_and_resolve():
    assert {"smollm2_dspark", "tiny_llama_dspark"} <= set(list_recipes())
    for name in list_recipes():
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
        assert cfg.drafter.loss_decay == 4.0  # the reference code's decay, not gamma


def test_overrides_are_typed():
    cfg = load_config("smollm2_dspark", ["train.lr=1e-3", "target.layer_ids=[0, 5]", "run_dir=/tmp/x",
                                         "drafter.dspark.enable_confidence_head=false", "drafter.dspark.markov_rank=0",
                                         "drafter.dspark.markov_head_type=rnn", "eval.temperatures=[0]"])
    assert cfg.train.lr == 1e-3
    assert cfg.target.layer_ids == [0, 5]
    assert cfg.run_dir == "/tmp/x"
    assert (cfg.drafter.dspark.enable_confidence_head, cfg.drafter.dspark.markov_rank) == (False, 0)
    assert cfg.drafter.dspark.markov_head_type == "rnn"
    assert cfg.drafter.num_anchors == 32  # the rest of the recipe's drafter section is kept
    assert cfg.eval.temperatures == [0.0]
    e3 = load_config("smollm2_eagle3", ["drafter.eagle3.ttt_length=3", "drafter.eagle3.qk_norm=true"]).drafter.eagle3
    assert (e3.ttt_length, e3.ttt_decay, e3.qk_norm) == (3, 0.8, True)
    v4 = load_config("tiny_deepseek_v4_dspark", ["drafter.v4.moe_bias_update_rate=0"]).drafter.v4
    assert v4.moe_bias_update_rate == 0.0


@pytest.mark.parametrize(("old", "new"), [("drafter.markov_rank=0", "drafter.dspark.markov_rank"),
                                          ("drafter.ttt_length=3", "drafter.eagle3.ttt_length"),
                                          ("drafter.eagle3_qk_norm=true", "drafter.eagle3.qk_norm"),
                                          ("drafter.moe_bias_update_rate=0", "drafter.v4.moe_bias_update_rate")])
def test_a_moved_drafter_key_is_one_line_naming_the_new_one(old, new, tmp_path):
    message = (f"config key {old.split('=')[0]} is now {new} (each algorithm's drafter settings live in its own "
               "section)")
    with pytest.raises(ConfigError) as err:
        load_config("smollm2_dspark", [old])
    assert str(err.value) == message
    # The same in a recipe or a saved config.json (e.g. a run directory written before the sections).
    key, value = old.split("=")
    (tmp_path / "old.yaml").write_text(f"target: {{name_or_path: x, layer_ids: [0]}}\n"
                                       f"drafter: {{{key.split('.')[1]}: {value}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(tmp_path / "old.yaml"))
    assert str(err.value) == message


@pytest.mark.parametrize(("recipe", "algorithm", "section"), [("smollm2_dspark", "dspark", "dspark"),
                                                              ("smollm2_dflash", "dflash", None),
                                                              ("smollm2_eagle3", "eagle3", "eagle3"),
                                                              ("tiny_deepseek_v4_dspark", "dspark_v4", "v4")])
def test_a_recipe_of_each_algorithm_sets_only_its_own_section(recipe, algorithm, section):
    from dspark.config import DRAFTER_SECTIONS, load_recipe_dict

    drafter = load_recipe_dict(recipe)["drafter"]
    assert load_config(recipe).drafter.algorithm == drafter["algorithm"] == algorithm
    own = {name for name, readers in DRAFTER_SECTIONS.items() if algorithm in readers}
    assert set(drafter) & set(DRAFTER_SECTIONS) <= own and (section is None or section in own)
    # Another algorithm's section is refused, naming the field and who reads it.
    other = "eagle3" if algorithm != "eagle3" else "dspark"
    field = {"eagle3": "ttt_length=2", "dspark": "markov_rank=8"}[other]
    with pytest.raises(ConfigError, match=rf"^drafter.{other}.{field.split('=')[0]} is set .* algorithm {algorithm} "
                                          rf"does not read the {other} section"):
        load_config(recipe, [f"drafter.{other}.{field}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nope=1", "unknown config key 'train.nope'; valid keys under 'train': .*grad_clip"),
        ("bogus=1", "unknown config key 'bogus'; valid keys under '<top>': cache, data"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.zero_stage=1.5", "train.zero_stage: expected an integer"),
        ("target.layer_ids=[3, 2]", "strictly increasing"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of fp32, bf16, fp16"),
        ("target.backend=tp", "target.backend: 'tp' is not one of hf, zero3, pipeline, megatron"),
        ("eval.policy_sweep=[full, greedy]", r"eval.policy_sweep\[1\]: 'greedy' is not one of full, threshold"),
        ("train.offload_optimizer=true", "offload_optimizer needs train.zero_stage 1, 2 or 3"),
        ("train.lr", "not of the form key.path=value"),
        ("train.keep_last=0", r"train.keep_last must be >= 1, got 0"),
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


def _numeric_fields(lists_only: bool = False) -> list[str]:
    """``section.field`` of every int / float field, and of every list of them, in the schema (only the lists
    with ``lists_only``)."""
    import dataclasses
    import typing

    keys = []

    def walk(cls, prefix: str) -> None:
        for name, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):  # a nested section (drafter.dspark, ...)
                walk(tp, f"{prefix}{name}.")
                continue
            is_list = typing.get_origin(tp) is list
            item = typing.get_args(tp)[0] if is_list else tp
            if item in (int, float) and (is_list or not lists_only):
                keys.append(prefix + name)

    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        if dataclasses.is_dataclass(cls):
            walk(cls, f"{section.name}.")
    return keys


def test_every_numeric_field_has_a_range():
    # layer_ids: checked as a whole (increasing, >= -1) by validate.
    assert sorted(set(_numeric_fields()) - {"target.layer_ids"}) == sorted(RANGES), \
        "a numeric config field needs its range in dspark.config.RANGES"


def _outside(key: str) -> list:
    """One value just outside ``key``'s range on each bounded side."""
    r = RANGES[key]
    values = [r.lo if r.lo_open else r.lo - 1]
    if r.hi is not None:
        values.append(r.hi if r.hi_open else r.hi + 1)
    return values


@pytest.mark.parametrize("key", sorted(RANGES))
def test_a_number_out_of_range_is_one_line_naming_field_and_range(key):
    is_list = key in _numeric_fields(lists_only=True)
    for bad in _outside(key):
        with pytest.raises(ConfigError) as err:
            load_config("tiny_llama_dspark", [f"{key}=[{bad}]" if is_list else f"{key}={bad}"])
        name = f"{key}[0]" if is_list else key
        assert str(err.value) == f"{name} must be {RANGES[key]}, got {err.value.args[0].rsplit('got ', 1)[1]}"
        assert err.value.args[0].rsplit("got ", 1)[1] in (repr(bad), repr(float(bad)))  # the value given


def test_nan_is_out_of_every_range():
    with pytest.raises(ConfigError, match=r"^train.lr must be > 0, got nan$"):
        load_config("tiny_llama_dspark", ["train.lr=.nan"])


def test_cli_zero_micro_batch_is_one_line(tmp_path):
    from click.testing import CliRunner

    from dspark.cli import main

    result = CliRunner().invoke(main, ["train", "-c", "tiny_llama_dspark", "--set", f"run_dir={tmp_path}",
                                       "--set", "train.micro_batch_size=0"])
    assert result.exit_code == 1 and result.exception is not None
    assert result.output.strip() == "Error: train.micro_batch_size must be >= 1, got 0"
    assert not (tmp_path / "config.json").exists()


def test_enumerated_overrides_keep_their_text():
    # YAML would read `off` as false and `on` as true: an enumerated field keeps what was typed.
    assert load_config("smollm2_dspark", ["data.thinking=off"]).data.thinking == "off"
    assert load_config("smollm2_dspark", ["data.thinking=on"]).data.thinking == "on"
