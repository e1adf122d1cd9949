"""Eagle3 (one fused-feature layer, training-time test) on the tiny random llama target, otherwise as
tiny_llama_dspark."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("tiny_llama_dspark")
RECIPE["run_dir"] = "runs/tiny_llama_eagle3"
RECIPE["drafter"].update(algorithm="eagle3", num_layers=1, markov_rank=0, enable_confidence_head=False,
                         ttt_length=4, ttt_decay=0.8)
