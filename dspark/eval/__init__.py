"""Evaluation: speculative decoding with a drafter against the target, acceptance metrics, plots."""

from dspark.eval.metrics import EvalReport, conditional_acceptance, format_table, prefix_survival, tau
from dspark.eval.specdec import GenerationResult, evaluate, speculative_generate, target_generate

__all__ = ["EvalReport", "GenerationResult", "conditional_acceptance", "evaluate", "format_table",
           "prefix_survival", "speculative_generate", "target_generate", "tau"]
