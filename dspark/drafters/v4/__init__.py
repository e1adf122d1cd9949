"""DeepSeek-V4's production DSpark drafter (the ``mtp.*`` MoE + mHC + sliding-window draft); see ``model.py``."""

from dspark.drafters.v4.model import DSparkV4Drafter

__all__ = ["DSparkV4Drafter"]
