"""The layout of a run directory, in one place for the CLI stages (``dspark.stages``) and the trainer.

    <run>/config.json             the resolved config of the last stage that ran (``RunConfig.save``)
    <run>/data/train.jsonl        prepared conversations          <run>/data/eval_prompts.jsonl  held-out prompts
    <run>/cache                   the hidden-state cache           <run>/checkpoints              training checkpoints
    <run>/drafter                 the trained drafter              <run>/tensorboard              metrics
    <run>/eval                    eval reports and plots           <run>/export/<format>          exported drafters
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @classmethod
    def of(cls, cfg) -> RunPaths:
        """The paths of ``cfg.run_dir``."""
        return cls(Path(cfg.run_dir))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def train_data(self) -> Path:
        return self.root / "data" / "train.jsonl"

    @property
    def eval_prompts(self) -> Path:
        return self.root / "data" / "eval_prompts.jsonl"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def drafter(self) -> Path:
        return self.root / "drafter"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def export(self, fmt: str) -> Path:
        return self.root / "export" / fmt
