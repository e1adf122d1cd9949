"""DSpark / DFlash parallel drafter (block drafting with KV injection, Markov and confidence heads)."""

from dspark.drafters.dspark.model import DSparkDrafter, resolve_mask_token_id

__all__ = ["DSparkDrafter", "resolve_mask_token_id"]
