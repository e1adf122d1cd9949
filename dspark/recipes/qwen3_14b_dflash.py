"""DFlash (CE only, no sequential or confidence head) for Qwen3-14B, otherwise as qwen3_14b_dspark."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("qwen3_14b_dspark")
RECIPE["run_dir"] = "runs/qwen3_14b_dflash"
RECIPE["drafter"].pop("dspark")  # DSpark's sequential heads: DFlash trains without them
RECIPE["drafter"]["algorithm"] = "dflash"
