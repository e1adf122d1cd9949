"""Eagle3 to serve on SGLang/vLLM (`--format eagle3`): as smollm2_eagle3 but with the 3 feature layers
their LlamaForCausalLMEagle3 takes (fc is [H, 3H]): low, middle, high of SmolLM2-135M's 30 decoder layers,
[1, L/2 - 1, L - 4] = the engines' default capture (SGLang/vLLM capture the inputs of layers 2, L/2, L - 3)."""

from dspark.config import load_recipe_dict

NUM_TARGET_LAYERS = 30
RECIPE = load_recipe_dict("smollm2_eagle3")
RECIPE["run_dir"] = "runs/smollm2_eagle3_serve"
RECIPE["target"]["layer_ids"] = [1, NUM_TARGET_LAYERS // 2 - 1, NUM_TARGET_LAYERS - 4]
