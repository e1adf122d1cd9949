"""DSpark on the tiny random Gemma4 target (builtin:tiny-gemma4: sliding and global layers, K = V, softcapped
logits, Gemma's tokenizer and chat template), mask token <mask> (id 4) as the Gemma4 recipes; otherwise as
tiny_llama_dspark. The whole pipeline on CPU in about a minute."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("tiny_llama_dspark")
RECIPE["run_dir"] = "runs/tiny_gemma4_dspark"
RECIPE["target"].update(name_or_path="builtin:tiny-gemma4", layer_ids=[0, 1, 2], family="gemma4")
RECIPE["drafter"].update(mask_token_id=4)
