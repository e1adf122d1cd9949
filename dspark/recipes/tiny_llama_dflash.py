"""DFlash on the tiny random llama target, otherwise as tiny_llama_dspark."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("tiny_llama_dspark")
RECIPE["run_dir"] = "runs/tiny_llama_dflash"
RECIPE["drafter"].pop("dspark")  # DSpark's sequential heads: DFlash trains without them
RECIPE["drafter"]["algorithm"] = "dflash"
