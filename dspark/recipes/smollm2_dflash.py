"""DFlash (CE only, no sequential or confidence head) on the built-in SmolLM2 target, otherwise as smollm2_dspark."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("smollm2_dspark")
RECIPE["run_dir"] = "runs/smollm2_dflash"
RECIPE["drafter"].pop("dspark")  # DSpark's sequential heads: DFlash trains without them
RECIPE["drafter"]["algorithm"] = "dflash"
