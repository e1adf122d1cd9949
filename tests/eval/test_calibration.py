"""Confidence-head calibration metrics on hand-made cases: ECE, AUROC and Brier by direct computation, AUROC
against the trapezoidal ROC area (what sklearn's roc_auc_score integrates), the (confidence, outcome) pairs of
round records, the static cumulative-confidence cut, the reliability PNG and the calibration table."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from dspark.eval.calibration import (
    CalibrationReport,
    auroc,
    brier,
    confidence_pairs,
    ece,
    reliability_bins,
)
from dspark.eval.metrics import EvalReport, format_calibration_table
from dspark.eval.plots import plot_reliability
from dspark.eval.specdec import confident_length

# Six pairs: the bins (15 equal-width, width 1/15) they fall in are noted per pair.
CONF = [0.05, 0.05, 0.50, 0.52, 0.90, 1.00]  # bins 0, 0, 7, 7, 13, 14
LABEL = [0, 1, 0, 1, 1, 1]


def test_ece_auroc_brier_by_hand():
    # Bins: {0.05, 0.05} acc 1/2 conf 0.05; {0.50, 0.52} acc 1/2 conf 0.51; {0.90} acc 1; {1.00} acc 1.
    expected_ece = (2 / 6) * abs(0.05 - 0.5) + (2 / 6) * abs(0.51 - 0.5) + (1 / 6) * 0.10 + (1 / 6) * 0.0
    assert ece(CONF, LABEL) == pytest.approx(expected_ece)
    count, mean_conf, accuracy = reliability_bins(CONF, LABEL)
    assert [(b, n) for b, n in enumerate(count) if n] == [(0, 2), (7, 2), (13, 1), (14, 1)]
    assert mean_conf[7] == pytest.approx(0.51) and accuracy[7] == 0.5 and math.isnan(accuracy[3])

    expected_brier = (0.05**2 + 0.95**2 + 0.5**2 + 0.48**2 + 0.1**2 + 0.0) / 6
    assert brier(CONF, LABEL) == pytest.approx(expected_brier)

    # AUROC: over the 4 x 2 (positive, negative) pairs count wins, ties as 1/2. Positives 0.05, 0.52, 0.90, 1.00;
    # negatives 0.05, 0.50. vs 0.05: tie, win, win, win = 3.5; vs 0.50: loss, win, win, win = 3.
    assert auroc(CONF, LABEL) == pytest.approx(6.5 / 8)


def _trapezoid_roc_auc(conf: list[float], label: list[int]) -> float:
    """The ROC curve through every distinct threshold (tied scores move both rates at once), integrated by the
    trapezoid rule: sklearn's roc_auc_score, written out."""
    num_pos = sum(label)
    num_neg = len(label) - num_pos
    points = [(0.0, 0.0)]
    tp = fp = 0
    for threshold in sorted(set(conf), reverse=True):
        tp += sum(y for c, y in zip(conf, label) if c == threshold)
        fp += sum(1 - y for c, y in zip(conf, label) if c == threshold)
        points.append((fp / num_neg, tp / num_pos))
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(points))


def test_auroc_equals_the_trapezoidal_roc_area_with_ties():
    rng = random.Random(0)
    for _ in range(20):
        # Coarse scores (many ties), outcomes correlated with them.
        conf = [rng.randrange(11) / 10 for _ in range(60)]
        label = [int(rng.random() < 0.2 + 0.6 * c) for c in conf]
        assert auroc(conf, label) == pytest.approx(_trapezoid_roc_auc(conf, label), abs=1e-12)
    assert auroc([0.1, 0.9], [0, 1]) == 1.0 and auroc([0.9, 0.1], [0, 1]) == 0.0
    assert auroc([0.3, 0.3, 0.3], [0, 1, 1]) == 0.5
    assert math.isnan(auroc([0.2, 0.4], [1, 1]))  # one class only: undefined


def test_bad_pairs_are_refused():
    with pytest.raises(ValueError, match="3 confidences but 2 labels"):
        ece([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\], got 1.5"):
        brier([1.5], [1])
    with pytest.raises(ValueError, match="labels must be 0 or 1, got 2"):
        auroc([0.5, 0.5], [0, 2])
    with pytest.raises(ValueError, match="round 1: 1 confidences for 2 proposed drafts"):
        confidence_pairs([0, 1], [1, 2], [[0.5], [0.5]])


# Three rounds: accepted 1 of 3 (slot 2 rejected), 3 of 3, 0 of 2.
ACCEPTED = [1, 3, 0]
PROPOSED = [3, 3, 2]
CONFIDENCES = [[0.9, 0.5, 0.4], [0.8, 0.8, 0.5], [0.2, 0.9]]


def test_pairs_from_round_records():
    slot, cumulative = confidence_pairs(ACCEPTED, PROPOSED, CONFIDENCES)
    # Slot pairs: only slots a round reached (its earlier slots accepted).
    assert slot == [(1, 0.9, 1), (2, 0.5, 0), (1, 0.8, 1), (2, 0.8, 1), (3, 0.5, 1), (1, 0.2, 0)]
    # Cumulative pairs: every proposed slot, product of confidences against "all of 1..k accepted".
    assert [(k, y) for k, _, y in cumulative] == [(1, 1), (2, 0), (3, 0), (1, 1), (2, 1), (3, 1), (1, 0), (2, 0)]
    assert [c for _, c, _ in cumulative] == pytest.approx([0.9, 0.45, 0.18, 0.8, 0.64, 0.32, 0.2, 0.18])

    report = CalibrationReport.from_rounds(ACCEPTED, PROPOSED, CONFIDENCES)
    assert report.num_pairs == 6 and report.count_K == [3, 2, 1]
    assert report.mean_confidence_K == pytest.approx([(0.9 + 0.8 + 0.2) / 3, 0.65, 0.5])
    assert report.accept_rate_K == pytest.approx([2 / 3, 0.5, 1.0])
    assert report.auroc == pytest.approx(auroc([0.9, 0.5, 0.8, 0.8, 0.5, 0.2], [1, 0, 1, 1, 1, 0]))
    assert report.brier_K[2] == pytest.approx(0.25) and math.isnan(report.auroc_K[2])  # slot 3: one outcome
    assert report.survival_brier == pytest.approx(
        brier([c for _, c, _ in cumulative], [y for _, _, y in cumulative]))


def test_report_carries_calibration_into_json_table_and_png(tmp_path):
    with_conf = EvalReport.from_rounds(ACCEPTED, PROPOSED, generated_tokens=9, num_prompts=1, wall_s=1.0,
                                       temperature=1.0, confidences=CONFIDENCES)
    without = EvalReport.from_rounds(ACCEPTED, PROPOSED, generated_tokens=9, num_prompts=1, wall_s=1.0,
                                     temperature=1.0)
    assert without.calibration is None and without.to_dict()["calibration"] is None
    as_dict = with_conf.to_dict()
    json.dumps(as_dict, allow_nan=False)  # NaN (slot 3's AUROC) became None
    assert as_dict["calibration"]["auroc_K"][2] is None and as_dict["calibration"]["count_K"] == [3, 2, 1]

    lines = format_calibration_table({"dspark": with_conf, "plain": without}).splitlines()
    assert lines[0].split()[:5] == ["drafter", "pairs", "ece", "auroc", "brier"] and len(lines) == 3
    assert lines[2].split()[:2] == ["dspark", "6"]
    with pytest.raises(ValueError, match="needs a report with calibration"):
        format_calibration_table({"plain": without})

    data = plot_reliability({"dspark": with_conf, "plain": without}, tmp_path / "rel.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (800, 500)
    with pytest.raises(ValueError, match="needs a report with calibration"):
        plot_reliability({"plain": without}, tmp_path / "none.png")


def test_confident_length_cuts_at_the_cumulative_product():
    conf_K = torch.tensor([0.9, 0.8, 0.9, 0.5])  # cumulative 0.9, 0.72, 0.648, 0.324
    assert confident_length(conf_K, 0.0) is None and confident_length(None, 0.5) is None
    assert confident_length(conf_K, 0.7) == 2  # a per-slot rule would keep 3 (0.9 >= 0.7 at slot 3)
    assert confident_length(conf_K, 0.6) == 3
    assert confident_length(conf_K, 0.3) == 4
    assert confident_length(conf_K, 0.95) == 0
