"""Eagle3 (one fused-feature layer, TTT length 7, step weights 0.8^s) on the built-in SmolLM2 target, otherwise as
smollm2_dspark (same feature layers, gamma 7 at decode time, full vocabulary)."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("smollm2_dspark")
RECIPE["run_dir"] = "runs/smollm2_eagle3"
RECIPE["drafter"].pop("dspark")  # DSpark's sequential heads are not Eagle3's
RECIPE["drafter"].update(algorithm="eagle3", num_layers=1, eagle3={"ttt_length": 7, "ttt_decay": 0.8})
