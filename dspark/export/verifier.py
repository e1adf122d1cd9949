"""The verifier (target) an export names, as something a serving engine can load: a Hugging Face directory or
hub id whose config has ``architectures``. Never ``builtin:...`` and never null.

``verifier_config(name_or_path)`` resolves a dspark target name to such a source and returns its HF config with
``_name_or_path`` set to it. Built-in targets are written once as HF directories under the dspark cache
(``$DSPARK_CACHE_DIR``, default ``~/.cache/dspark``) and reused: ``builtin:tiny-*`` already are; a GGUF target
(``builtin:smollm2`` or a ``.gguf`` path) is dequantised and saved with its tokenizer (safetensors) to
``verifiers/<name>-<digest>``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

MARKER = ".dspark-verifier-complete"


def _cache_root() -> Path:
    from dspark.targets.source import dspark_cache_dir

    return dspark_cache_dir()


def _gguf_digest(path: Path) -> str:
    """Cheap identity of a GGUF file (name, size, mtime): a changed file gets a new verifier directory."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def gguf_to_hf_dir(folder: str, gguf_file: str, display: str, cache_root: Path | None = None) -> Path:
    """The HF directory (config with architectures, safetensors, tokenizer) of a GGUF model, written on first use."""
    gguf = Path(folder) / gguf_file
    out = (cache_root or _cache_root()) / "verifiers" / f"{display}-{_gguf_digest(gguf)}"
    if (out / MARKER).is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # transformers refuses to save a model it loaded from GGUF (its quantizer stays attached), though the weights
    # are plain dequantised tensors: move them into a model built from the config alone, which saves normally.
    config = loaded.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(tmp)  # safetensors; config.json carries architectures
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(tmp)
    (tmp / MARKER).write_text(f"{gguf}\n")
    try:
        tmp.rename(out)
    except OSError:  # another process published the same directory first
        if not (out / MARKER).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def verifier_source(name_or_path: str) -> str:
    """An engine-loadable name for the dspark target ``name_or_path``: a local HF directory (absolute path) or a
    hub id. Built-in and GGUF targets are written as HF directories first (cached)."""
    from dspark.targets.source import resolve_target_source

    source, gguf_file, display = resolve_target_source(str(name_or_path))
    if gguf_file:
        return str(gguf_to_hf_dir(source, gguf_file, display).resolve())
    if Path(source).is_dir():
        return str(Path(source).resolve())
    return source  # a hub id


def verifier_config(name_or_path: str):
    """The HF config of the verifier ``name_or_path`` (see ``verifier_source``) with ``_name_or_path`` set to the
    engine-loadable source; refuses a config without ``architectures`` (engines pick the model class from it)."""
    from transformers import AutoConfig

    source = verifier_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ValueError(f"verifier {name_or_path!r}: cannot read its config at {source} ({exc})") from None
    if not getattr(config, "architectures", None):
        raise ValueError(f"verifier {name_or_path!r}: {source}/config.json has no 'architectures'; engines need it "
                         f"to load the verifier")
    config._name_or_path = source
    return config


def plain_target_config(name_or_path: str):
    """The HF config of a dspark target as dspark reads it (a GGUF's own metadata; no HF directory is written),
    with ``_name_or_path`` = ``name_or_path``: enough for layouts that only cross-check dims (deepspec)."""
    from transformers import AutoConfig

    from dspark.targets.source import resolve_target_source

    source, gguf_file, _ = resolve_target_source(str(name_or_path))
    config = AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    config._name_or_path = str(name_or_path)
    return config


def check_verifier_fields(name_or_path, architectures, where: str) -> None:
    """Refuse verifier fields an engine cannot load: a null or ``builtin:`` name, or no architectures."""
    if not name_or_path or str(name_or_path).startswith("builtin:"):
        raise ValueError(f"{where}: verifier name {name_or_path!r} is not loadable by an engine; pass the target "
                         f"(--verifier NAME_OR_PATH: an HF directory, hub id or dspark built-in target)")
    if not architectures or not isinstance(architectures, (list, tuple)):
        raise ValueError(f"{where}: verifier {name_or_path} has no architectures list ({architectures!r}); pass "
                         f"--verifier with a target whose config names its architectures")


def verifier_fields(target_config, where: str) -> dict:
    """``speculators_config.verifier`` of an export: the verifier's engine-loadable name and architectures (from
    ``target_config``, e.g. ``dspark.export.verifier.verifier_config``); refuses what an engine could not load."""
    from dspark.drafters.common import config_get

    if target_config is None:
        raise ValueError(f"{where}: the speculators format names its verifier; pass the target "
                         f"(--verifier NAME_OR_PATH)")
    name = config_get(target_config, "_name_or_path") or config_get(target_config, "name_or_path")
    architectures = config_get(target_config, "architectures")
    check_verifier_fields(name, architectures, where)
    return {"name_or_path": str(name), "architectures": list(architectures)}
