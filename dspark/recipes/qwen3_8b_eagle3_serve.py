"""Eagle3 to serve on SGLang/vLLM (`--format eagle3`): as qwen3_8b_eagle3 but with the 3 feature layers
their LlamaForCausalLMEagle3 takes (fc is [H, 3H]): low, middle, high of Qwen3-8B's 36 decoder layers,
[1, L/2 - 1, L - 4] = the engines' default capture (SGLang/vLLM capture the inputs of layers 2, L/2, L - 3)."""

from dspark.config import load_recipe_dict

NUM_TARGET_LAYERS = 36
RECIPE = load_recipe_dict("qwen3_8b_eagle3")
RECIPE["run_dir"] = "runs/qwen3_8b_eagle3_serve"
RECIPE["target"]["layer_ids"] = [1, NUM_TARGET_LAYERS // 2 - 1, NUM_TARGET_LAYERS - 4]
