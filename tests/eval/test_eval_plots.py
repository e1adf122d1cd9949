"""The acceptance plot is written as a valid PNG of the requested size."""

from __future__ import annotations

import pytest

from dspark.eval.metrics import EvalReport
from dspark.eval.plots import plot_acceptance


def _report(accepted, proposed) -> EvalReport:
    return EvalReport.from_rounds(accepted, proposed, generated_tokens=sum(accepted) + len(accepted),
                                  num_prompts=1, wall_s=1.0, temperature=0.0)


def test_plot_acceptance_writes_a_png(tmp_path):
    reports = {"trained": _report([3, 2, 4, 1], [4, 4, 4, 4]), "untrained": _report([0, 0, 1], [4, 4, 2])}
    path = plot_acceptance(reports, tmp_path / "plots" / "acceptance_T0.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # IHDR chunk: width and height in pixels (8 x 4 inches at 100 dpi).
    assert data[12:16] == b"IHDR"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (800, 400)


def test_plot_acceptance_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one report"):
        plot_acceptance({}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="must end in .png"):
        plot_acceptance({"x": _report([1], [2])}, tmp_path / "a.pdf")
