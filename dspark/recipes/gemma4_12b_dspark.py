"""DSpark for Gemma4-12B (48 decoder layers) at the reference settings: feature layers [5, 17, 29, 41, 46], mask
token <mask> (id 4), otherwise as qwen3_14b_dspark (5 draft layers, gamma 7, 512 anchors, lr 6e-4). The draft layers
follow Gemma4 (sandwich norms, global attention geometry, softcapped logits) because the target is a Gemma4."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("qwen3_14b_dspark")
RECIPE["run_dir"] = "runs/gemma4_12b_dspark"
RECIPE["target"].update(name_or_path="google/gemma-4-12b-it", layer_ids=[5, 17, 29, 41, 46], family="gemma4")
RECIPE["drafter"].update(mask_token_id=4)
