"""dspark: train speculative-decoding drafters (DSpark, DFlash, Eagle3) for large frozen target LLMs."""

__version__ = "0.1.0"
