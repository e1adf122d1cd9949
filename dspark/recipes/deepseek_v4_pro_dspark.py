"""DeepSeek-V4-Pro's own DSpark draft: as deepseek_v4_flash_dspark with Pro's released settings (target layers
58-60 of 61, Markov rank 512)."""

import copy

from dspark.config import load_recipe_dict

RECIPE = copy.deepcopy(load_recipe_dict("deepseek_v4_flash_dspark"))
RECIPE["run_dir"] = "runs/deepseek_v4_pro_dspark"
RECIPE["target"].update(name_or_path="deepseek-ai/DeepSeek-V4-Pro", layer_ids=[58, 59, 60])
RECIPE["drafter"]["dspark"].update(markov_rank=512)
