"""DFlash (CE only, no sequential or confidence head) for Gemma4-12B, otherwise as gemma4_12b_dspark."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("gemma4_12b_dspark")
RECIPE["run_dir"] = "runs/gemma4_12b_dflash"
RECIPE["drafter"].update(algorithm="dflash", markov_rank=0, enable_confidence_head=False)
