"""What every attach-on exporter shares: the tensor check against a layout and the atomic write of the files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], layout: str, where: str,
                  frozen: tuple[str, ...] = ()) -> None:
    """Refuse tensors that are not exactly ``expected`` (names and shapes), naming what is missing, unexpected or
    misshapen. ``frozen`` names target matrices that must be real weights: all-zero or non-finite ones are refused
    (an exporter must never write placeholder embeddings)."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{where}: tensors do not match the {layout} layout; missing: {missing or 'none'}; "
                         f"unexpected: {extra or 'none'}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    for name in frozen:
        if name in tensors and (not torch.isfinite(tensors[name]).all() or not tensors[name].abs().sum() > 0):
            raise ValueError(f"{where}: {name} is all zero or not finite; it must be the target's frozen weight")


def write_checkpoint(out: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``model.safetensors`` then ``config.json`` under temporary names and rename each into place, so a
    reader never sees a half-written file (and config.json, written last, marks a complete export)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tmp_weights = out / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    tmp_config = out / f".config.json.tmp{os.getpid()}"
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_config, out / "config.json")
    return out
