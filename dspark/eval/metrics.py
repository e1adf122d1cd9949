"""Acceptance metrics of speculative decoding, computed from per-round records.

A round is one target verification: the drafter proposed ``proposed[r]`` tokens and the first ``accepted[r]``
of them were accepted (``0 <= accepted[r] <= proposed[r]``). Positions k are 1-based draft slots.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dspark.eval.calibration import CalibrationReport


def _check_rounds(accepted: list[int], proposed: list[int]) -> None:
    if len(accepted) != len(proposed):
        raise ValueError(f"accepted has {len(accepted)} rounds but proposed has {len(proposed)}")
    bad = [r for r, (a, p) in enumerate(zip(accepted, proposed)) if not 0 <= a <= p]
    if bad:
        r = bad[0]
        raise ValueError(f"round {r}: accepted {accepted[r]} is not within 0..proposed ({proposed[r]})")


def tau(accepted: list[int]) -> float:
    """Mean accepted length: mean over rounds of (accepted + 1), the +1 being the target's own token."""
    return sum(a + 1 for a in accepted) / len(accepted) if accepted else math.nan


def conditional_acceptance(accepted: list[int], proposed: list[int], num_positions: int | None = None) -> list[float]:
    """P(slot k accepted | slots 1..k-1 accepted), over rounds that proposed at least k tokens.

    Entry k-1 is NaN where no round reached slot k. ``num_positions`` defaults to the longest proposal.
    """
    _check_rounds(accepted, proposed)
    num_positions = max(proposed, default=0) if num_positions is None else num_positions
    out = []
    for k in range(1, num_positions + 1):
        reached = [a for a, p in zip(accepted, proposed) if p >= k and a >= k - 1]
        out.append(sum(a >= k for a in reached) / len(reached) if reached else math.nan)
    return out


def prefix_survival(accepted: list[int], proposed: list[int], num_positions: int | None = None) -> list[float]:
    """Fraction of rounds with at least k tokens accepted, over rounds that proposed at least k tokens.

    Rounds whose proposal was cut short (by the token budget or a stop token) cannot reach slot k and are left
    out of its denominator rather than counted as failures. Entry k-1 is NaN where no round proposed k tokens.
    """
    _check_rounds(accepted, proposed)
    num_positions = max(proposed, default=0) if num_positions is None else num_positions
    out = []
    for k in range(1, num_positions + 1):
        eligible = [a for a, p in zip(accepted, proposed) if p >= k]
        out.append(sum(a >= k for a in eligible) / len(eligible) if eligible else math.nan)
    return out


def json_safe(value):
    """``value`` (nested dicts and lists) with every NaN, i.e. "no data", as None: strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value

@dataclass(kw_only=True)
class EvalReport:
    """Speculative decoding summary of one drafter over a prompt set at one temperature."""

    temperature: float
    num_prompts: int
    num_rounds: int
    generated_tokens: int
    tau: float
    mean_proposal_len: float
    acceptance_K: list[float]  # conditional acceptance at slot k (index k-1)
    survival_K: list[float]  # prefix survival at slot k (index k-1)
    wall_s: float
    tokens_per_s: float
    confidence_threshold: float = 0.0  # drafting stopped below this cumulative confidence (0 = off)
    calibration: CalibrationReport | None = None  # when the drafter reports confidences
    # Plain target decoding of the same prompts at the same batch size (``NoDrafts``), measured in the same run;
    # NaN when not measured. tokens_per_s / target_tokens_per_s is the real speedup, which tau alone is not.
    target_tokens_per_s: float = math.nan

    @property
    def speedup_vs_target(self) -> float:
        if math.isnan(self.target_tokens_per_s) or not self.target_tokens_per_s > 0:
            return math.nan
        return self.tokens_per_s / self.target_tokens_per_s

    @classmethod
    def from_rounds(cls, accepted: list[int], proposed: list[int], *, generated_tokens: int, num_prompts: int,
                    wall_s: float, temperature: float, confidences: list[list[float]] | None = None,
                    confidence_threshold: float = 0.0) -> EvalReport:
        """Aggregate per-round records (all prompts concatenated) into a report; ``confidences`` (one list per
        round, one entry per proposed draft) adds the calibration of the confidence head."""
        _check_rounds(accepted, proposed)
        calibration = CalibrationReport.from_rounds(accepted, proposed, confidences) if confidences else None
        return cls(
            temperature=float(temperature),
            num_prompts=num_prompts,
            num_rounds=len(accepted),
            generated_tokens=generated_tokens,
            tau=tau(accepted),
            mean_proposal_len=sum(proposed) / len(proposed) if proposed else math.nan,
            acceptance_K=conditional_acceptance(accepted, proposed),
            survival_K=prefix_survival(accepted, proposed),
            wall_s=wall_s,
            tokens_per_s=generated_tokens / wall_s if wall_s > 0 else math.nan,
            confidence_threshold=float(confidence_threshold),
            calibration=calibration,
        )

    def to_dict(self) -> dict:
        """JSON-safe dict (NaN, i.e. 'no data', becomes None)."""
        return json_safe({**asdict(self), "speedup_vs_target": self.speedup_vs_target})


def _fmt(value: float, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.{digits}f}"


def format_table(reports: dict[str, EvalReport]) -> str:
    """A fixed-width text table, one row per drafter: tau, proposal length, throughput and its ratio to plain
    target decoding at the same batch size ("vs_tgt", when measured), acceptance at each slot."""
    if not reports:
        raise ValueError("format_table needs at least one report")
    num_positions = max(len(r.acceptance_K) for r in reports.values())
    name_width = max(7, *(len(name) for name in reports))
    header = (f"{'drafter':<{name_width}}  {'tau':>6}  {'len':>5}  {'rounds':>7}  {'tokens':>7}  {'tok/s':>8}"
              f"  {'vs_tgt':>6}"
              + "".join(f"  {f'acc@{k}':>6}" for k in range(1, num_positions + 1)))
    lines = [header, "-" * len(header)]
    for name, r in reports.items():
        acceptance = r.acceptance_K + [math.nan] * (num_positions - len(r.acceptance_K))
        lines.append(
            f"{name:<{name_width}}  {_fmt(r.tau, 6, 3)}  {_fmt(r.mean_proposal_len, 5, 2)}  {r.num_rounds:>7d}"
            f"  {r.generated_tokens:>7d}  {_fmt(r.tokens_per_s, 8, 1)}  {_fmt(r.speedup_vs_target, 6, 2)}"
            + "".join(f"  {_fmt(a, 6, 3)}" for a in acceptance)
        )
    return "\n".join(lines)


def format_calibration_table(reports: dict[str, EvalReport]) -> str:
    """Confidence-head calibration per drafter (those that report confidences): slot-level ECE, AUROC, Brier,
    the same for the cumulative product against prefix survival, and ECE at each position."""
    rows = {name: r.calibration for name, r in reports.items() if r.calibration is not None}
    if not rows:
        raise ValueError("format_calibration_table needs a report with calibration (a drafter with confidences)")
    num_positions = max(len(c.ece_K) for c in rows.values())
    name_width = max(7, *(len(name) for name in rows))
    header = (f"{'drafter':<{name_width}}  {'pairs':>6}  {'ece':>6}  {'auroc':>6}  {'brier':>6}  {'s.ece':>6}"
              f"  {'s.auroc':>7}  {'s.brier':>7}" + "".join(f"  {f'ece@{k}':>6}" for k in range(1, num_positions + 1)))
    lines = [header, "-" * len(header)]
    for name, c in rows.items():
        ece_K = c.ece_K + [math.nan] * (num_positions - len(c.ece_K))
        lines.append(
            f"{name:<{name_width}}  {c.num_pairs:>6d}  {_fmt(c.ece, 6, 3)}  {_fmt(c.auroc, 6, 3)}"
            f"  {_fmt(c.brier, 6, 3)}"
            f"  {_fmt(c.survival_ece, 6, 3)}  {_fmt(c.survival_auroc, 7, 3)}  {_fmt(c.survival_brier, 7, 3)}"
            + "".join(f"  {_fmt(e, 6, 3)}" for e in ece_K)
        )
    return "\n".join(lines)
