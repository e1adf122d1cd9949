"""Eagle3 on the tiny random Gemma4 target (one Gemma4 midlayer, training-time test; exported as the reference's
Gemma4Eagle3Model), otherwise as tiny_gemma4_dspark and tiny_llama_eagle3."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("tiny_gemma4_dspark")
RECIPE["run_dir"] = "runs/tiny_gemma4_eagle3"
RECIPE["drafter"].pop("dspark")  # DSpark's sequential heads are not Eagle3's
RECIPE["drafter"].update(algorithm="eagle3", num_layers=1, eagle3={"ttt_length": 4, "ttt_decay": 0.8})
