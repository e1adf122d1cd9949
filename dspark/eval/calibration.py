"""How well a drafter's confidence head predicts acceptance (DESIGN section 4, "Calibration and scheduling").

Two kinds of (confidence, outcome) pairs come out of the per-round records (``accepted[r]`` of ``proposed[r]``
drafts accepted, ``confidences[r][k-1]`` the head's output c_k for slot k):

- per slot, the question the head is trained on: c_k against "slot k accepted", over the slots a round
  reached (slots 1..k-1 accepted, k <= proposed). Reported pooled and per position k.
- cumulative, the question the paper's scheduler asks: a_k = prod_{i<=k} c_i against "the first k drafts all
  accepted", over every proposed slot (slots after a rejection count as failures).

Metrics: ECE over ``num_bins`` equal-width bins (bin b holds c in [b/n, (b+1)/n), c = 1 in the last bin; the
gap of each bin weighted by its share of pairs), AUROC (Mann-Whitney rank statistic, tied confidences get their
average rank; NaN when only one outcome occurs), Brier (mean squared error of c against the 0/1 outcome).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

NUM_BINS = 15


def _check_pairs(confidence: list[float], label: list[int]) -> None:
    if len(confidence) != len(label):
        raise ValueError(f"{len(confidence)} confidences but {len(label)} labels")
    bad = [c for c in confidence if not 0.0 <= c <= 1.0]
    if bad:
        raise ValueError(f"confidences must lie in [0, 1], got {bad[0]!r}")
    if any(y not in (0, 1) for y in label):
        raise ValueError(f"labels must be 0 or 1, got {min(set(label) - {0, 1})!r}")


def brier(confidence: list[float], label: list[int]) -> float:
    """Mean of (c - y)^2; NaN for no pairs."""
    _check_pairs(confidence, label)
    return sum((c - y) ** 2 for c, y in zip(confidence, label)) / len(label) if label else math.nan


def reliability_bins(confidence: list[float], label: list[int], num_bins: int = NUM_BINS
                     ) -> tuple[list[int], list[float], list[float]]:
    """Per equal-width bin: (number of pairs, mean confidence, accuracy); the means are NaN for empty bins."""
    _check_pairs(confidence, label)
    count = [0] * num_bins
    conf_sum = [0.0] * num_bins
    hits = [0] * num_bins
    for c, y in zip(confidence, label):
        b = min(int(c * num_bins), num_bins - 1)
        count[b] += 1
        conf_sum[b] += c
        hits[b] += y
    mean_conf = [s / n if n else math.nan for s, n in zip(conf_sum, count)]
    accuracy = [h / n if n else math.nan for h, n in zip(hits, count)]
    return count, mean_conf, accuracy


def ece(confidence: list[float], label: list[int], num_bins: int = NUM_BINS) -> float:
    """Expected calibration error: sum over bins of (pairs in bin / pairs) * |mean confidence - accuracy|."""
    count, mean_conf, accuracy = reliability_bins(confidence, label, num_bins)
    total = sum(count)
    if not total:
        return math.nan
    return sum(n / total * abs(c - a) for n, c, a in zip(count, mean_conf, accuracy) if n)


def auroc(confidence: list[float], label: list[int]) -> float:
    """P(c of a random positive > c of a random negative) + 0.5 P(tie), from average ranks."""
    _check_pairs(confidence, label)
    num_pos = sum(label)
    num_neg = len(label) - num_pos
    if not num_pos or not num_neg:
        return math.nan
    order = sorted(range(len(confidence)), key=confidence.__getitem__)
    rank_sum_pos = 0.0
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and confidence[order[j + 1]] == confidence[order[i]]:
            j += 1
        average_rank = (i + j) / 2 + 1  # ranks are 1-based; a tie group shares the mean of its ranks
        rank_sum_pos += average_rank * sum(label[order[m]] for m in range(i, j + 1))
        i = j + 1
    return (rank_sum_pos - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def confidence_pairs(accepted: list[int], proposed: list[int], confidences: list[list[float]]
                     ) -> tuple[list[tuple[int, float, int]], list[tuple[int, float, int]]]:
    """(slot pairs, cumulative pairs) as (k, confidence, outcome) triples; see the module docstring."""
    if not len(accepted) == len(proposed) == len(confidences):
        raise ValueError(f"{len(accepted)} accepted, {len(proposed)} proposed and {len(confidences)} confidence "
                         "records: one per round each")
    slot, cumulative = [], []
    for r, (a, p, conf) in enumerate(zip(accepted, proposed, confidences)):
        if len(conf) != p:
            raise ValueError(f"round {r}: {len(conf)} confidences for {p} proposed drafts")
        survival = 1.0
        for k, c in enumerate(conf, start=1):
            survival *= c
            cumulative.append((k, survival, int(a >= k)))
            if k <= a + 1:
                slot.append((k, c, int(a >= k)))
    return slot, cumulative


@dataclass(kw_only=True)
class CalibrationReport:
    """Calibration of the confidence head over one evaluation (NaN = no data)."""

    num_pairs: int  # slot pairs (slots reached)
    ece: float
    auroc: float
    brier: float
    count_K: list[int]  # slot pairs at position k (index k-1)
    mean_confidence_K: list[float]
    accept_rate_K: list[float]
    ece_K: list[float]
    auroc_K: list[float]
    brier_K: list[float]
    bin_count: list[int]  # reliability diagram of the pooled slot pairs
    bin_confidence: list[float]
    bin_accuracy: list[float]
    survival_ece: float  # cumulative product a_k against prefix survival, every proposed slot
    survival_auroc: float
    survival_brier: float

    @classmethod
    def from_rounds(cls, accepted: list[int], proposed: list[int], confidences: list[list[float]],
                    num_bins: int = NUM_BINS) -> CalibrationReport:
        slot, cumulative = confidence_pairs(accepted, proposed, confidences)
        conf = [c for _, c, _ in slot]
        label = [y for _, _, y in slot]
        num_positions = max(proposed, default=0)
        per_k = [([c for k, c, _ in slot if k == pos], [y for k, _, y in slot if k == pos])
                 for pos in range(1, num_positions + 1)]
        bin_count, bin_confidence, bin_accuracy = reliability_bins(conf, label, num_bins)
        surv_conf = [c for _, c, _ in cumulative]
        surv_label = [y for _, _, y in cumulative]
        return cls(
            num_pairs=len(slot), ece=ece(conf, label, num_bins), auroc=auroc(conf, label), brier=brier(conf, label),
            count_K=[len(c) for c, _ in per_k],
            mean_confidence_K=[sum(c) / len(c) if c else math.nan for c, _ in per_k],
            accept_rate_K=[sum(y) / len(y) if y else math.nan for _, y in per_k],
            ece_K=[ece(c, y, num_bins) for c, y in per_k], auroc_K=[auroc(c, y) for c, y in per_k],
            brier_K=[brier(c, y) for c, y in per_k],
            bin_count=bin_count, bin_confidence=bin_confidence, bin_accuracy=bin_accuracy,
            survival_ece=ece(surv_conf, surv_label, num_bins), survival_auroc=auroc(surv_conf, surv_label),
            survival_brier=brier(surv_conf, surv_label),
        )

    def to_dict(self) -> dict:
        return asdict(self)
