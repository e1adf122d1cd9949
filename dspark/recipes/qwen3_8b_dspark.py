"""DSpark for Qwen3-8B: as qwen3_4b_dspark (36 decoder layers too, so the same feature layers)."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("qwen3_4b_dspark")
RECIPE["run_dir"] = "runs/qwen3_8b_dspark"
RECIPE["target"].update(name_or_path="Qwen/Qwen3-8B", layer_ids=[1, 9, 17, 25, 33])
