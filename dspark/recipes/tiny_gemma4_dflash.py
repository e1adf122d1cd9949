"""DFlash on the tiny random Gemma4 target, otherwise as tiny_gemma4_dspark."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("tiny_gemma4_dspark")
RECIPE["run_dir"] = "runs/tiny_gemma4_dflash"
RECIPE["drafter"].pop("dspark")  # DSpark's sequential heads: DFlash trains without them
RECIPE["drafter"]["algorithm"] = "dflash"
