"""Attach-on exporters (one module per layout) and their loaders for round trips.

``export_drafter(drafter, out_dir, fmt)`` is the single entry the CLI uses; each format lives in its own module
(``deepspec.py``; more layouts register in ``FORMATS``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

# Format name -> (module, export function). Modules are imported lazily: safetensors only when exporting.
FORMATS = {"deepspec": ("dspark.export.deepspec", "export_deepspec"),
           "eagle3": ("dspark.export.eagle3", "export_eagle3"),
           "speculators": ("dspark.export.speculators", "export_speculators"),
           "deepseek-v4-mtp": ("dspark.export.deepseek_v4", "export_mtp_bf16"),
           "deepseek-v4-mtp-fp8": ("dspark.export.deepseek_v4", "export_mtp_fp8")}

__all__ = ["FORMATS", "export_deepspec", "export_drafter", "load_deepspec"]


def export_drafter(drafter, out_dir: str | os.PathLike, fmt: str = "deepspec", target_config=None) -> Path:
    """Write ``drafter`` to ``out_dir`` in layout ``fmt``; ``target_config`` (optional) is cross-checked."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} unknown; expected one of: {', '.join(sorted(FORMATS))}")
    # A drafter that only one family of layouts can hold (DeepSeek-V4's mtp.* draft) lists them.
    allowed = getattr(drafter, "export_formats", None)
    if allowed is not None and fmt not in allowed:
        raise ValueError(f"export format {fmt!r} cannot hold drafter {drafter.algorithm!r}; expected one of: "
                         f"{', '.join(allowed)}")
    module, function = FORMATS[fmt]
    return getattr(importlib.import_module(module), function)(drafter, target_config, out_dir)


def __getattr__(name):
    if name in ("export_deepspec", "load_deepspec"):
        from dspark.export import deepspec

        return getattr(deepspec, name)
    raise AttributeError(name)
