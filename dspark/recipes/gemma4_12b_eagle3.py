"""Eagle3 for Gemma4-12B at the reference settings: feature layers [5, 17, 29, 41, 46], one Gemma4 midlayer, TTT
length 7 with step weights 0.8^s, full vocabulary, gamma 7 at decode time; target and optimiser as
gemma4_12b_dspark (lr 6e-4). Exported as the reference's Gemma4Eagle3Model (--format deepspec)."""

from dspark.config import load_recipe_dict

RECIPE = load_recipe_dict("gemma4_12b_dspark")
RECIPE["run_dir"] = "runs/gemma4_12b_eagle3"
RECIPE["drafter"].pop("dspark")  # DSpark's sequential heads are not Eagle3's
RECIPE["drafter"].update(algorithm="eagle3", num_layers=1,
                         eagle3={"ttt_length": 7, "ttt_decay": 0.8, "draft_vocab_size": 0})
