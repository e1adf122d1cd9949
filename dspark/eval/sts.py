"""Sequential Temperature Scaling of the confidence head (DESIGN section 4, "Calibration and scheduling").

The head's output at slot k is ``c_k = sigmoid(logit_k)``, the probability that draft k survives given that drafts
1..k-1 did; the scheduler ranks drafts by the cumulative product ``a_k = prod_{i<=k} c_i``. STS divides logit k by a
temperature ``T_k`` and fits the temperatures one slot at a time: for k = 1..gamma, with T_1..T_{k-1} fixed at
their fitted values, ``T_k`` is the grid value minimising the ECE (``calibration.ece``, same bins) of
``a_k = prod_{i<=k} sigmoid(logit_i / T_i)`` against "the first k drafts were all accepted", over every round that
proposed at least k drafts. Ties go to the grid value nearest 1 (the smallest change).

Logits: evaluation records the head's confidences (fp32 sigmoid outputs), not its logits, so
``logits_from_confidences`` inverts the sigmoid after clamping c to [2^-24, 1 - 2^-24]. fp32 rounding of c near 1
costs about 6e-8 * e^logit in the recovered logit (1e-3 at logit 10, 0.2 at 15) and a saturated confidence (0 or 1 in
fp32) maps to +-16.6: harmless for calibration, since such slots sit in the top bin either way. Record the
confidences of an *uncalibrated* head (temperatures 1), or the inversion gives logit / T instead of the logit.

The fitted temperatures live beside the drafter's weights as ``calibration.json`` (``CALIBRATION_FILE``), versioned;
``read_calibration`` refuses a file it does not understand. Legend: R rounds, K slots (gamma), G grid values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dspark.eval.calibration import NUM_BINS
from dspark.eval.metrics import json_safe

CALIBRATION_FILE = "calibration.json"
CALIBRATION_VERSION = 1
# Smallest distance of an fp32 value below 1 from 1: confidences are clamped this far inside (0, 1).
_CONF_EPS = 2.0**-24


def temperature_grid(min_temperature: float, max_temperature: float, step: float) -> list[float]:
    """``min, min + step, ..., <= max`` (rounded to 1e-9 so 0.1 steps print cleanly); all values > 0."""
    if not 0 < min_temperature <= max_temperature or not step > 0:
        raise ValueError(f"STS grid needs 0 < min <= max and step > 0, got min={min_temperature!r}, "
                         f"max={max_temperature!r}, step={step!r}")
    num = math.floor((max_temperature - min_temperature) / step + 1e-9) + 1
    return [round(min_temperature + i * step, 9) for i in range(num)]


def logits_from_confidences(confidences: list[list[float]]) -> list[list[float]]:
    """Inverse sigmoid of recorded confidences, clamped to [2^-24, 1 - 2^-24] first (see the module docstring)."""
    out = []
    for r, conf in enumerate(confidences):
        row = []
        for c in conf:
            if not 0.0 <= c <= 1.0:  # also rejects NaN
                raise ValueError(f"round {r}: confidence {c!r} is not a probability in [0, 1]")
            c = min(max(c, _CONF_EPS), 1.0 - _CONF_EPS)
            row.append(math.log(c) - math.log1p(-c))
        out.append(row)
    return out


def apply_temperatures(logits: list[list[float]], temperatures: list[float]) -> list[list[float]]:
    """Per round, ``c_k = sigmoid(logit_k / T_k)``; rounds may be shorter than ``temperatures``."""
    width = max((len(row) for row in logits), default=0)
    if width > len(temperatures):
        raise ValueError(f"a round has {width} confidence logits but only {len(temperatures)} temperatures")
    return [[1.0 / (1.0 + math.exp(-z / t)) if z / t > -700 else 0.0 for z, t in zip(row, temperatures)]
            for row in logits]


def _padded(accepted: list[int], proposed: list[int], logits: list[list[float]]):
    """Rounds as tensors: logit_RK (0 past a round's proposal), proposed_R, accepted_R (float64 / long)."""
    if not len(accepted) == len(proposed) == len(logits):
        raise ValueError(f"{len(accepted)} accepted, {len(proposed)} proposed and {len(logits)} logit records: "
                         "one per round each")
    for r, (a, p, z) in enumerate(zip(accepted, proposed, logits)):
        if len(z) != p or not 0 <= a <= p:
            raise ValueError(f"round {r}: {len(z)} logits, {p} proposed, {a} accepted; expected one logit per "
                             "proposed draft and 0 <= accepted <= proposed")
    width = max(proposed, default=0)
    logit_RK = torch.zeros(len(logits), width, dtype=torch.float64)
    for r, z in enumerate(logits):
        logit_RK[r, : len(z)] = torch.tensor(z, dtype=torch.float64)
    return logit_RK, torch.tensor(proposed, dtype=torch.long), torch.tensor(accepted, dtype=torch.long)


def batched_ece(conf_GN: torch.Tensor, label_N: torch.Tensor, num_bins: int = NUM_BINS) -> torch.Tensor:
    """``calibration.ece`` of G candidate confidence vectors against one label vector at once -> ``[G]``."""
    G, N = conf_GN.shape
    if N == 0:
        return torch.full((G,), math.nan, dtype=torch.float64)
    conf_GN = conf_GN.double()
    bin_GN = (conf_GN * num_bins).floor().long().clamp(0, num_bins - 1)  # c = 1 goes to the last bin
    conf_GB = torch.zeros(G, num_bins, dtype=torch.float64).scatter_add_(1, bin_GN, conf_GN)
    hits_GB = torch.zeros(G, num_bins, dtype=torch.float64).scatter_add_(
        1, bin_GN, label_N.double().expand(G, N).contiguous())
    # sum_b n_b/N * |conf_b/n_b - hits_b/n_b| = sum_b |conf_b - hits_b| / N; empty bins add 0.
    return (conf_GB - hits_GB).abs().sum(dim=1) / N


def fit_sts(accepted: list[int], proposed: list[int], logits: list[list[float]], grid: list[float],
            num_bins: int = NUM_BINS) -> list[float]:
    """Sequential temperatures ``T_1..T_K`` (K = the longest proposal) fitted on the given rounds.

    A slot no round reached keeps T = 1.
    """
    if not grid or any(not t > 0 for t in grid):
        raise ValueError(f"STS grid must be a non-empty list of temperatures > 0, got {grid!r}")
    logit_RK, proposed_R, accepted_R = _padded(accepted, proposed, logits)
    grid_G = torch.tensor(grid, dtype=torch.float64)
    # Candidates sorted by distance to 1 so that argmin (first minimum) breaks ties toward the smallest change.
    order = sorted(range(len(grid)), key=lambda g: (abs(grid[g] - 1.0), grid[g]))
    grid_G = grid_G[order]
    prefix_R = torch.ones(len(accepted), dtype=torch.float64)  # prod_{i<k} c_i with the fitted T_i
    temperatures = []
    for k in range(1, logit_RK.shape[1] + 1):
        rows = proposed_R >= k
        if not bool(rows.any()):
            temperatures.append(1.0)
            continue
        label_N = (accepted_R[rows] >= k).double()
        candidates_GN = prefix_R[rows] * torch.sigmoid(logit_RK[rows, k - 1] / grid_G[:, None])
        best = int(batched_ece(candidates_GN, label_N, num_bins).argmin())
        temperatures.append(float(grid_G[best]))
        prefix_R = prefix_R * torch.sigmoid(logit_RK[:, k - 1] / grid_G[best])
    return temperatures


def survival_ece_K(accepted: list[int], proposed: list[int], confidences: list[list[float]],
                   num_bins: int = NUM_BINS) -> list[float]:
    """ECE of ``a_k`` against "first k accepted" at each slot k (what ``fit_sts`` minimises); NaN = no rounds."""
    logit_RK, proposed_R, accepted_R = _padded(accepted, proposed, confidences)  # same layout; values are c
    out, prefix_R = [], torch.ones(len(accepted), dtype=torch.float64)
    for k in range(1, logit_RK.shape[1] + 1):
        prefix_R = prefix_R * logit_RK[:, k - 1]
        rows = proposed_R >= k
        out.append(float(batched_ece(prefix_R[rows][None], (accepted_R[rows] >= k).double(), num_bins)[0]))
    return out


# -- calibration.json ----------------------------------------------------------------------------------------


def write_calibration(drafter_dir: str | Path, temperatures: list[float], **stats) -> Path:
    """Write ``calibration.json`` (version, method "sts", temperatures, then ``stats``: ECE before/after,
    held-out counts, grid ...) into ``drafter_dir``; returns its path."""
    path = Path(drafter_dir) / CALIBRATION_FILE
    payload = {"version": CALIBRATION_VERSION, "method": "sts", "temperatures": [float(t) for t in temperatures]}
    payload.update(stats)
    path.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
    return path


def read_calibration(drafter_dir: str | Path, block_size: int | None = None) -> list[float] | None:
    """The per-slot temperatures of ``drafter_dir/calibration.json``, or None when there is no such file.

    Refuses (ValueError naming the file) invalid JSON, another version or method, and temperatures that are not
    ``block_size`` positive finite numbers.
    """
    path = Path(drafter_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    if payload.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"{path}: calibration version {payload.get('version')!r} is not supported; this dspark "
                         f"reads version {CALIBRATION_VERSION}")
    if payload.get("method") != "sts":
        raise ValueError(f"{path}: calibration method {payload.get('method')!r} unknown; expected 'sts'")
    temps = payload.get("temperatures")
    if (not isinstance(temps, list)
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0
                       for t in temps)):
        raise ValueError(f"{path}: 'temperatures' must be a list of finite numbers > 0, got {temps!r}")
    if block_size is not None and len(temps) != block_size:
        raise ValueError(f"{path}: {len(temps)} temperatures for a drafter of block size {block_size}; expected "
                         f"one per slot (recalibrate with `dspark calibrate`)")
    return [float(t) for t in temps]


def format_sts_table(temperatures: list[float], ece_before_K: list[float], ece_after_K: list[float],
                     ece_before: float, ece_after: float) -> str:
    """Per slot: the fitted temperature and the held-out ECE of ``a_k`` before / after; then the pooled ECE."""

    def fmt(x: float) -> str:
        return f"{'-':>10}" if math.isnan(x) else f"{x:>10.4f}"

    header = f"{'slot':>4}  {'T_k':>6}  {'ece before':>10}  {'ece after':>10}"
    lines = [header, "-" * len(header)]
    for k, (t, b, a) in enumerate(zip(temperatures, ece_before_K, ece_after_K), start=1):
        lines.append(f"{k:>4}  {t:>6.3f}  {fmt(b)}  {fmt(a)}")
    lines.append(f"{'all':>4}  {'':>6}  {fmt(ece_before)}  {fmt(ece_after)}")
    return "\n".join(lines)
