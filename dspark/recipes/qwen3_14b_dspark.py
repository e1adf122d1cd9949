"""DSpark for Qwen3-14B: as qwen3_4b_dspark with the feature layers spread over its 40 decoder layers."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("qwen3_4b_dspark")
RECIPE["run_dir"] = "runs/qwen3_14b_dspark"
RECIPE["target"].update(name_or_path="Qwen/Qwen3-14B", layer_ids=[1, 10, 19, 28, 37])
