"""Evaluation: speculative decoding with a drafter against the target, acceptance and calibration metrics, plots."""

from dspark.eval.calibration import CalibrationReport, auroc, brier, ece
from dspark.eval.metrics import (
    EvalReport,
    conditional_acceptance,
    format_table,
    prefix_survival,
    tau,
)
from dspark.eval.scheduler import SPSTable, schedule_capacity, schedule_prefixes, simulate
from dspark.eval.specdec import (
    GenerationResult,
    evaluate,
    speculative_generate,
    speculative_generate_batch,
    target_generate,
)
from dspark.eval.sts import fit_sts, read_calibration, write_calibration

__all__ = ["CalibrationReport", "EvalReport", "GenerationResult", "SPSTable", "auroc", "brier",
           "conditional_acceptance", "ece", "evaluate", "fit_sts", "format_table", "prefix_survival",
           "read_calibration", "schedule_capacity", "schedule_prefixes", "simulate", "speculative_generate",
           "speculative_generate_batch", "target_generate", "tau", "write_calibration"]
