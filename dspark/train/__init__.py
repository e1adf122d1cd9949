"""Training: DeepSpeed engine around the drafter, one loop for every algorithm."""
