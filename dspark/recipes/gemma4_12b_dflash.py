"""DFlash (CE only, no sequential or confidence head) for Gemma4-12B, otherwise as gemma4_12b_dspark."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("gemma4_12b_dspark")
RECIPE["run_dir"] = "runs/gemma4_12b_dflash"
RECIPE["drafter"].pop("dspark")  # DSpark's sequential heads: DFlash trains without them
RECIPE["drafter"]["algorithm"] = "dflash"
