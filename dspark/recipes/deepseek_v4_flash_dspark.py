"""DeepSeek-V4-Flash's own DSpark draft (the mtp.* layout DeepSeek ships, V4_DSPARK.md): 3 stages on target layers
40-42, block 5, Markov rank 256, noise token 128799, confidence head; DSpark's loss (0.1 CE + 0.9 L1 + 1.0 BCE,
decay 4); stages initialised from those target layers. Needs GPUs and the checkpoint (hosted by zero3)."""

RECIPE = {
    "run_dir": "runs/deepseek_v4_flash_dspark",
    "target": {"name_or_path": "deepseek-ai/DeepSeek-V4-Flash", "backend": "zero3", "dtype": "bfloat16",
               "layer_ids": [40, 41, 42]},
    "drafter": {"algorithm": "dspark_v4", "num_layers": 3, "block_size": 5, "mask_token_id": 128799,
                "num_anchors": 512, "loss_decay": 4.0, "init_from_target": True,
                "dspark": {"markov_rank": 256, "markov_head_type": "vanilla", "enable_confidence_head": True,
                           "ce_weight": 0.1, "l1_weight": 0.9, "bce_weight": 1.0}},
    "train": {"lr": 6.0e-4, "warmup_ratio": 0.04, "min_lr_ratio": 0.0, "grad_clip": 1.0, "precision": "bf16",
              "zero_stage": 2},
}
