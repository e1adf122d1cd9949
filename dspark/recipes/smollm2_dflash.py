"""DFlash (CE only, no sequential or confidence head) on the built-in SmolLM2 target, otherwise as smollm2_dspark."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("smollm2_dspark")
RECIPE["run_dir"] = "runs/smollm2_dflash"
RECIPE["drafter"].update(algorithm="dflash", markov_rank=0, enable_confidence_head=False)
