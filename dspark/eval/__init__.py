"""Evaluation: speculative decoding with a drafter against the target, acceptance and calibration metrics, plots."""

from dspark.eval.calibration import CalibrationReport, auroc, brier, ece
from dspark.eval.metrics import (
    EvalReport,
    conditional_acceptance,
    format_table,
    prefix_survival,
    tau,
)
from dspark.eval.specdec import (
    GenerationResult,
    evaluate,
    speculative_generate,
    speculative_generate_batch,
    target_generate,
)

__all__ = ["CalibrationReport", "EvalReport", "GenerationResult", "auroc", "brier", "conditional_acceptance", "ece",
           "evaluate", "format_table", "prefix_survival", "speculative_generate", "speculative_generate_batch",
           "target_generate", "tau"]
