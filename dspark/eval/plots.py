"""Plots of evaluation reports (PNG through matplotlib's Agg canvas, so no display or global backend is needed)."""

from __future__ import annotations

from pathlib import Path

from dspark.eval.metrics import EvalReport


def _png_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {str(path)!r}")
    return path


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_acceptance(reports: dict[str, EvalReport], path: str | Path) -> Path:
    """Conditional acceptance by draft position, one line per drafter (tau in the legend); returns the path."""
    if not reports:
        raise ValueError("plot_acceptance needs at least one report")
    path = _png_path(path)
    return _save(acceptance_figure(reports), path)


def acceptance_figure(reports: dict[str, EvalReport]):
    """The matplotlib ``Figure`` that ``plot_acceptance`` writes: one line per drafter, in ``reports`` order."""
    # Imported here: matplotlib costs ~0.5 s and only plotting needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    num_positions = 1
    for name, report in reports.items():
        positions = list(range(1, len(report.acceptance_K) + 1))
        num_positions = max(num_positions, len(positions))
        ax.plot(positions, report.acceptance_K, marker="o", label=f"{name} (tau {report.tau:.2f})")
    temperatures = sorted({r.temperature for r in reports.values()})
    ax.set_title(f"acceptance by draft position (T = {', '.join(f'{t:g}' for t in temperatures)})")
    ax.set_xlabel("draft position k")
    ax.set_ylabel("P(accept k | 1..k-1 accepted)")
    ax.set_xticks(range(1, num_positions + 1))
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    # Outside the axes: lines of good drafters sit at the top, where a legend inside would hide them.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def plot_reliability(reports: dict[str, EvalReport], path: str | Path) -> Path:
    """Reliability diagram of the confidence head (slot confidence c_k against acceptance of slot k, pooled over
    positions, equal-width bins), one line per drafter that reports confidences (ECE in the legend)."""
    if not any(r.calibration is not None for r in reports.values()):
        raise ValueError("plot_reliability needs a report with calibration (a drafter with confidences)")
    path = _png_path(path)
    return _save(reliability_figure(reports), path)


def reliability_figure(reports: dict[str, EvalReport]):
    """The matplotlib ``Figure`` that ``plot_reliability`` writes: the diagonal, then one line per calibrated
    drafter (its non-empty bins), in ``reports`` order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    calibrated = {name: r for name, r in reports.items() if r.calibration is not None}
    fig = Figure(figsize=(8.0, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    for name, report in calibrated.items():
        c = report.calibration
        points = [(x, y) for n, x, y in zip(c.bin_count, c.bin_confidence, c.bin_accuracy) if n]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o",
                label=f"{name} (ECE {c.ece:.3f}, {c.num_pairs} slots)")
    temperatures = sorted({r.temperature for r in calibrated.values()})
    ax.set_title(f"confidence reliability (T = {', '.join(f'{t:g}' for t in temperatures)})")
    ax.set_xlabel("confidence c_k (bin mean)")
    ax.set_ylabel("P(slot k accepted | 1..k-1 accepted)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # outside: points reach every corner
    return fig


def plot_policy_throughput(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Generated tokens/s against requests in flight, one line per verify policy (rows of
    ``dspark.eval.policies.policy_sweep``); the CPU analogue of the paper's throughput-vs-concurrency figure."""
    if not rows:
        raise ValueError("plot_policy_throughput needs at least one row")
    path = _png_path(path)
    return _save(policy_throughput_figure(rows, title), path)


def policy_throughput_figure(rows: list[dict], title: str = ""):
    """The matplotlib ``Figure`` that ``plot_policy_throughput`` writes: one line per policy, batch sizes sorted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r["batch_size"], r["tokens_per_s"]) for r in rows if r["policy"] == policy)
        ax.plot([b for b, _ in mine], [t for _, t in mine], marker="o", label=policy)
    batch_sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.set_title(title or "throughput against concurrency")
    ax.set_xlabel("requests in flight (batch size)")
    ax.set_ylabel("generated tokens / s (wall)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig
