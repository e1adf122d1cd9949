"""Where a target comes from: ``target.name_or_path`` (a built-in name, a local directory or ``.gguf`` file, a hub id)
resolved to what the backends load."""

from __future__ import annotations

import os
from pathlib import Path

from dspark.targets.builtin import BUILTIN_TARGETS, builtin_gguf


def dspark_cache_dir() -> Path:
    return Path(os.environ.get("DSPARK_CACHE_DIR", Path.home() / ".cache" / "dspark"))


def resolve_target_source(name_or_path: str) -> tuple[str, str | None, str]:
    """Map ``target.name_or_path`` to (directory or hub id, gguf file name or None, display name)."""
    if name_or_path in BUILTIN_TARGETS:
        return builtin_gguf(name_or_path)
    if name_or_path.startswith("builtin:tiny-"):
        from dspark.targets.tiny import builtin_tiny_dir

        family = name_or_path.removeprefix("builtin:tiny-")
        return str(builtin_tiny_dir(family, dspark_cache_dir())), None, f"tiny-{family}"
    if name_or_path.startswith("builtin:"):
        from dspark.targets.tiny import TINY_FAMILIES

        names = ", ".join([*BUILTIN_TARGETS, *(f"builtin:tiny-{family}" for family in TINY_FAMILIES)])
        raise ValueError(f"unknown built-in target {name_or_path!r}; expected one of {names}")
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"target path {name_or_path} does not exist")
        return str(path.parent), path.name, path.stem
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"target directory {name_or_path} has no config.json")
        return str(path), None, path.name
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and name_or_path.count("/") != 1:
        raise ValueError(f"target path {name_or_path} does not exist")
    return name_or_path, None, name_or_path  # a hub id


def local_checkpoint_dir(name_or_path: str, backend: str) -> tuple[Path, str]:
    """(directory, display name) of a target the sharded backends read: only a local directory of safetensors
    shards will do, since each rank reads its own slices from the index."""
    source, gguf_file, display = resolve_target_source(name_or_path)
    if gguf_file or not Path(source).is_dir():
        what = "a GGUF file" if gguf_file else "not a local directory"
        raise ValueError(f"target.backend={backend} reads a local directory of safetensors shards; {name_or_path!r} "
                         f"is {what} (load it with target.backend=hf, or save_pretrained it to a directory first)")
    return Path(source), display
