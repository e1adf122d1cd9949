"""The plots draw the reports' numbers (read back from the matplotlib figure they save) into a PNG of the requested
size."""

from __future__ import annotations

import math

import pytest

from dspark.eval.metrics import EvalReport
from dspark.eval.plots import acceptance_figure, plot_acceptance, plot_reliability, reliability_figure


def _report(accepted, proposed, confidences=None) -> EvalReport:
    return EvalReport.from_rounds(accepted, proposed, generated_tokens=sum(accepted) + len(accepted),
                                  num_prompts=1, wall_s=1.0, temperature=0.0, confidences=confidences)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _lines(fig) -> list[tuple[list[float], list[float], str]]:
    (ax,) = fig.axes
    return [(list(line.get_xdata()), list(line.get_ydata()), line.get_label()) for line in ax.get_lines()]


def _same(got: list[float], expected: list[float]) -> bool:
    return len(got) == len(expected) and all(
        (math.isnan(g) and math.isnan(e)) or g == pytest.approx(e) for g, e in zip(got, expected))


def test_plot_acceptance_draws_each_drafters_acceptance_by_position(tmp_path):
    reports = {"trained": _report([3, 2, 4, 1], [4, 4, 4, 4]), "untrained": _report([0, 0, 1], [4, 4, 2])}
    # By hand: P(slot k accepted | slots before it accepted), over the rounds that proposed slot k; tau = mean(a+1).
    expected = {"trained": ([1.0, 0.75, 2 / 3, 0.5], 3.5), "untrained": ([1 / 3, 0.0, math.nan, math.nan], 4 / 3)}
    lines = _lines(acceptance_figure(reports))
    assert [label for _, _, label in lines] == [f"{name} (tau {tau:.2f})" for name, (_, tau) in expected.items()]
    for (x, y, _), (acceptance, _) in zip(lines, expected.values()):
        assert x == [1, 2, 3, 4] and _same(y, acceptance)
    path = plot_acceptance(reports, tmp_path / "plots" / "acceptance_T0.png")
    assert _png_size(path) == (800, 400)  # 8 x 4 inches at 100 dpi


def test_plot_reliability_draws_each_calibrated_drafters_bins(tmp_path):
    # Slot pairs (confidence, accepted) of the slots each round reached: round 1 accepted 1 of 2, so slot 2 was
    # tried and refused; round 2 refused slot 1, so its slot 2 was never tried.
    confident = _report([1, 0], [2, 2], confidences=[[0.95, 0.15], [0.85, 0.55]])
    reports = {"confident": confident, "plain": _report([1], [2])}
    lines = _lines(reliability_figure(reports))
    assert len(lines) == 2  # the diagonal and the one drafter with confidences
    assert lines[0][:2] == ([0, 1], [0, 1]) and lines[0][2] == "perfect calibration"
    x, y, label = lines[1]
    assert _same(x, [0.15, 0.85, 0.95]) and _same(y, [0.0, 0.0, 1.0])  # one pair a bin, empty bins left out
    assert label.startswith("confident (ECE ") and label.endswith(", 3 slots)")
    assert _png_size(plot_reliability(reports, tmp_path / "reliability.png")) == (800, 500)


def test_plots_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one report"):
        plot_acceptance({}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="must end in .png"):
        plot_acceptance({"x": _report([1], [2])}, tmp_path / "a.pdf")
    with pytest.raises(ValueError, match="needs a report with calibration"):
        plot_reliability({"x": _report([1], [2])}, tmp_path / "r.png")
