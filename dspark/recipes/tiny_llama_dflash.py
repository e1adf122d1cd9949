"""DFlash on the tiny random llama target, otherwise as tiny_llama_dspark."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("tiny_llama_dspark")
RECIPE["run_dir"] = "runs/tiny_llama_dflash"
RECIPE["drafter"].update(algorithm="dflash", markov_rank=0, enable_confidence_head=False)
