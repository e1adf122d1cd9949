"""Eagle3 for Qwen3-8B: one fused-feature layer, TTT length 7 with step weights 0.8^s, full vocabulary,
gamma 7 at decode time; target, feature layers and optimiser as qwen3_8b_dspark."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("qwen3_8b_dspark")
RECIPE["run_dir"] = "runs/qwen3_8b_eagle3"
RECIPE["drafter"].pop("dspark")  # DSpark's sequential heads are not Eagle3's
RECIPE["drafter"].update(algorithm="eagle3", num_layers=1,
                         eagle3={"ttt_length": 7, "ttt_decay": 0.8, "draft_vocab_size": 0})
