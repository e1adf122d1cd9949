"""Training metrics: TensorBoard scalars on rank 0 and a JSONL log beside them."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tau_estimate(accept_K: torch.Tensor) -> float:
    """Expected accepted length per round (bonus included) if slot k is accepted with prob ``accept_K[k]``
    given slots < k were: 1 + sum_k prod_{i<=k} a_i."""
    return float(1.0 + torch.cumprod(accept_K.double(), dim=0).sum())


class MetricsLogger:
    """Writes scalars to TensorBoard event files and to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, log_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(log_dir))
            self.jsonl = open(log_dir / "metrics.jsonl", "a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.flush()
            self.writer.close()
            self.jsonl.close()
