"""Every shipped recipe loads and validates (no download, no model), and the Qwen3 recipes carry the paper's
settings: gamma 7, 5 draft layers (Eagle3: 1), lr 6e-4 with 4% warmup then cosine, grad clip 1.0, 512 anchors."""

import pytest

from dspark.config import DSparkConfig, list_recipes, load_config

QWEN3_LAYERS = {"4b": [1, 9, 17, 25, 33], "8b": [1, 9, 17, 25, 33], "14b": [1, 10, 19, 28, 37]}


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_loads_and_validates(name):
    cfg = load_config(name)
    if name.endswith(("_dspark", "_dflash", "_eagle3")):
        # DeepSeek-V4's recipes train its own mtp.* DSpark draft (algorithm dspark_v4).
        assert cfg.drafter.algorithm == name.rsplit("_", 1)[1] + ("_v4" if "deepseek_v4" in name else "")
    if cfg.drafter.algorithm in ("eagle3", "dflash"):
        # DSpark's heads are not theirs: the recipe leaves drafter.dspark alone (it is not read).
        assert cfg.drafter.dspark == DSparkConfig()
    if cfg.drafter.algorithm == "eagle3":
        assert cfg.drafter.num_layers == 1


@pytest.mark.parametrize("size", sorted(QWEN3_LAYERS))
@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "eagle3"])
def test_qwen3_recipes(size, algorithm):
    cfg = load_config(f"qwen3_{size}_{algorithm}")
    assert cfg.target.name_or_path == f"Qwen/Qwen3-{size.upper()}"
    assert cfg.target.layer_ids == QWEN3_LAYERS[size]
    assert cfg.run_dir == f"runs/qwen3_{size}_{algorithm}"
    assert cfg.drafter.block_size == 7 and cfg.drafter.num_anchors == 512
    assert cfg.drafter.num_layers == (1 if algorithm == "eagle3" else 5)
    assert (cfg.train.lr, cfg.train.warmup_ratio, cfg.train.grad_clip) == (6e-4, 0.04, 1.0)
    if algorithm == "eagle3":
        e3 = cfg.drafter.eagle3
        assert (e3.ttt_length, e3.ttt_decay, e3.draft_vocab_size) == (7, 0.8, 0)
    if algorithm == "dspark":
        assert cfg.drafter.dspark.markov_rank == 256 and cfg.drafter.dspark.enable_confidence_head


@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "eagle3"])
def test_gemma4_12b_recipes(algorithm):
    """DESIGN 8.2: feature layers [5, 17, 29, 41, 46], mask token id 4, otherwise the Qwen3-14B settings."""
    cfg, ref = load_config(f"gemma4_12b_{algorithm}"), load_config(f"qwen3_14b_{algorithm}")
    assert cfg.target.layer_ids == [5, 17, 29, 41, 46] and cfg.drafter.mask_token_id == 4
    assert (cfg.target.family, ref.target.family) == ("gemma4", "qwen3")
    assert cfg.drafter.algorithm == algorithm and cfg.run_dir == f"runs/gemma4_12b_{algorithm}"
    for section in ("train", "cache", "data"):
        assert getattr(cfg, section) == getattr(ref, section)
    assert {**vars(cfg.drafter), "mask_token_id": ref.drafter.mask_token_id} == vars(ref.drafter)


@pytest.mark.parametrize(("size", "layers", "rank"), [("flash", [40, 41, 42], 256), ("pro", [58, 59, 60], 512)])
def test_deepseek_v4_recipes_carry_the_released_draft_settings(size, layers, rank):
    cfg = load_config(f"deepseek_v4_{size}_dspark")
    assert cfg.target.name_or_path == f"deepseek-ai/DeepSeek-V4-{size.capitalize()}"
    assert cfg.target.layer_ids == layers and cfg.drafter.dspark.markov_rank == rank
    d = cfg.drafter
    assert (d.num_layers, d.block_size, d.mask_token_id, d.dspark.markov_head_type) == (3, 5, 128799, "vanilla")
    assert (d.dspark.ce_weight, d.dspark.l1_weight, d.dspark.bce_weight, d.loss_decay) == (0.1, 0.9, 1.0, 4.0)
    assert d.dspark.enable_confidence_head and d.init_from_target
