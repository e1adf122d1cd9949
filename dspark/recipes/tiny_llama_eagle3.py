"""Eagle3 (one fused-feature layer, training-time test) on the tiny random llama target, otherwise as
tiny_llama_dspark."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("tiny_llama_dspark")
RECIPE["run_dir"] = "runs/tiny_llama_eagle3"
RECIPE["drafter"].pop("dspark")  # DSpark's sequential heads are not Eagle3's
RECIPE["drafter"].update(algorithm="eagle3", num_layers=1, eagle3={"ttt_length": 4, "ttt_decay": 0.8})
