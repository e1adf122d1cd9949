"""Training metrics: TensorBoard scalars on rank 0 and a JSONL log beside them."""

from __future__ import annotations

import json
import resource
import time
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


class MetricsWindow:
    """The scalars of one logging window: throughput and the data-wait fraction since the last log, next to the
    loss, its terms and the acceptance statistics of the step that closes the window."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.total_tokens = 0  # this rank's, over the whole run
        self._reset()

    def _reset(self) -> None:
        self.start, self.tokens, self.wait_s = time.perf_counter(), 0, 0.0

    def add(self, tokens: int, wait_s: float) -> None:
        """One micro batch: its tokens on this rank and the seconds spent reading it (not waiting for other ranks)."""
        self.tokens += tokens
        self.total_tokens += tokens
        self.wait_s += wait_s

    def exclude(self, seconds: float) -> None:
        """Leave time that was not training (periodic eval decoding) out of tokens/s and the data-wait fraction."""
        self.start += seconds

    def close(self, loss: float, stats: dict, lr: float) -> dict[str, float]:
        """The window's scalars; a new window starts."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        scalars = {
            "loss/total": loss, **{f"loss/{k}": v for k, v in stats["terms"].items()},
            **{f"accept_rate@{k + 1}": a for k, a in enumerate(stats["accept_K"])},
            "tau_estimate": tau_estimate(torch.tensor(stats["accept_K"])),
            "lr": lr,
            "grad_norm": stats["grad_norm"] if stats["grad_norm"] is not None else float("nan"),
            "tokens_per_s": self.tokens * self.world_size / elapsed,
            "data_wait_fraction": self.wait_s / elapsed,
            "memory/peak_rss_gb": peak_rss_gb(),
        }
        self._reset()
        return scalars
