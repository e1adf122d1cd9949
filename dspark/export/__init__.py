"""Attach-on exporters (one module per layout) and their loaders for round trips.

``export_drafter(drafter, out_dir, fmt)`` is the single entry the CLI uses; each format lives in its own module
(``FORMATS``). ``detect_format(dir)`` / ``load_exported(dir)`` recognise a directory's format from its
``config.json`` (``DRAFTER_FORMATS``) and rebuild the drafter.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

# Format name -> (module, export function). Modules are imported lazily: safetensors only when exporting.
FORMATS = {"deepspec": ("dspark.export.deepspec", "export_deepspec"),
           "eagle3": ("dspark.export.eagle3", "export_eagle3"),
           "speculators": ("dspark.export.speculators", "export_speculators"),
           "deepseek-v4-mtp": ("dspark.export.deepseek_v4", "export_mtp_bf16"),
           "deepseek-v4-mtp-fp8": ("dspark.export.deepseek_v4", "export_mtp_fp8")}

# How a drafter directory's config.json is recognised, tried in order: (format, a top-level key only that format
# writes, or a (key, value) pair it must hold, or None; an ``architectures`` entry that marks it, or None; loader
# module, loader function). Loaders that take ``verifier=`` get the caller's target (formats that do not store the
# frozen embedding / LM head). Extend here for new layouts.
DRAFTER_FORMATS = (
    # DeepSeek-V4's mtp.* draft: a deepseek-v4-mtp export, or a whole V4 checkpoint that ships one.
    ("deepseek-v4-mtp", ("model_type", "deepseek_v4"), None, "dspark.export.deepseek_v4", "load_deepseek_v4_mtp"),
    ("speculators", "speculators_model_type", None, "dspark.export.speculators", "load_speculators"),
    ("eagle3", None, "LlamaForCausalLMEagle3", "dspark.export.eagle3", "load_eagle3"),
    # The reference's layout: its DSpark models and its Eagle3 ones (Qwen3Eagle3Model / Gemma4Eagle3Model, which
    # load_deepspec hands to dspark.export.deepspec_eagle3 by their architectures).
    ("deepspec", "target_layer_ids", None, "dspark.export.deepspec", "load_deepspec"),
)
VERIFIER_LOADERS = ("speculators",)

# The layout each algorithm's trainer writes (its final save, which load_drafter reads back): (format name as
# detect_format reports it, module, writer, keyword arguments). The one place that chooses it. Eagle3 drafters with
# the reference's midlayer (Gemma4, q/k-normed Qwen3) take "eagle3/deepspec"; the others the engines' layout at any
# feature-layer count (`dspark export --format eagle3` refuses counts SGLang/vLLM cannot load).
NATIVE_FORMATS = {
    "dspark": ("deepspec", "dspark.export.deepspec", "export_deepspec", {}),
    "dflash": ("deepspec", "dspark.export.deepspec", "export_deepspec", {}),
    "eagle3": ("eagle3", "dspark.export.eagle3", "export_eagle3", {"engine_layers": False}),
    "eagle3/deepspec": ("deepspec", "dspark.export.deepspec_eagle3", "export_deepspec_eagle3", {}),
    "dspark_v4": ("deepseek-v4-mtp", "dspark.export.deepseek_v4", "export_deepseek_v4_mtp", {"quantization": "none"}),
}

__all__ = ["DRAFTER_FORMATS", "FORMATS", "NATIVE_FORMATS", "detect_format", "export_deepspec", "export_drafter",
           "export_native", "load_deepspec", "load_drafter", "load_exported", "native_format"]


def _native_key(drafter) -> str:
    if drafter.algorithm == "eagle3" and drafter.deepspec_layout:
        return "eagle3/deepspec"
    return drafter.algorithm


def native_format(drafter) -> str:
    """The format name (as ``detect_format`` reports it) of the layout the trainer writes for ``drafter``."""
    return NATIVE_FORMATS[_native_key(drafter)][0]


def export_native(drafter, target_config, out_dir: str | os.PathLike) -> Path:
    """Write ``drafter`` in its algorithm's own layout (``NATIVE_FORMATS``) into ``out_dir``."""
    _, module, function, kwargs = NATIVE_FORMATS[_native_key(drafter)]
    return getattr(importlib.import_module(module), function)(drafter, target_config, out_dir, **kwargs)


def _read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not path.is_dir():
        raise ValueError(f"{path} is not a drafter directory (it does not exist or is a file)")
    if not config_path.is_file():
        raise ValueError(f"{path} is not a drafter directory: config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    return config


def detect_format(export_dir: str | os.PathLike) -> str:
    """The format (a ``DRAFTER_FORMATS`` name) of the drafter directory ``export_dir``; ValueError if none fits."""
    path = Path(export_dir)
    config = _read_config(path)
    for fmt, key, architecture, _, _ in DRAFTER_FORMATS:
        if isinstance(key, tuple):
            marked = config.get(key[0]) == key[1]
        else:
            marked = key is not None and key in config
        if marked or (architecture is not None and architecture in (config.get("architectures") or [])):
            return fmt
    marks = ", ".join(f"{fmt} ({'='.join(key) if isinstance(key, tuple) else key or 'architectures ' + repr(arch)})"
                      for fmt, key, arch, _, _ in DRAFTER_FORMATS)
    raise ValueError(f"{path} is not a drafter directory: its config.json (architectures "
                     f"{config.get('architectures')}) matches no drafter format; expected one of: {marks}")


def load_exported(export_dir: str | os.PathLike, verifier=None):
    """Rebuild the drafter in ``export_dir`` whatever its format; ``verifier`` (a target backend, a
    ``(config, embed_VH, lm_head_VH)`` tuple or a name) supplies frozen weights to formats that do not store them
    (default: the verifier named in the export)."""
    fmt = detect_format(export_dir)
    _, _, _, module, function = next(row for row in DRAFTER_FORMATS if row[0] == fmt)
    loader = getattr(importlib.import_module(module), function)
    return loader(export_dir, verifier=verifier) if fmt in VERIFIER_LOADERS else loader(export_dir)


def export_drafter(drafter, out_dir: str | os.PathLike, fmt: str = "deepspec", target_config=None,
                   overwrite: bool = False, extra_files: dict[str, str | os.PathLike] | None = None) -> Path:
    """Write ``drafter`` to ``out_dir`` in layout ``fmt``; ``target_config`` (the verifier's HF config; required by
    speculators) is cross-checked. The export is built in a fresh temporary directory and renamed into place; a
    non-empty ``out_dir`` is refused unless ``overwrite`` (then it is replaced whole). ``extra_files`` ({name:
    source}) are copied in beside the weights before the rename."""
    import shutil

    from dspark.export.common import check_target_dir, staged_dir

    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} unknown; expected one of: {', '.join(sorted(FORMATS))}")
    # A drafter that only one family of layouts can hold (DeepSeek-V4's mtp.* draft) lists them.
    allowed = drafter.export_formats
    if allowed is not None and fmt not in allowed:
        raise ValueError(f"export format {fmt!r} cannot hold drafter {drafter.algorithm!r}; expected one of: "
                         f"{', '.join(allowed)}")
    out = Path(out_dir)
    check_target_dir(out, overwrite)
    module, function = FORMATS[fmt]
    export = getattr(importlib.import_module(module), function)
    with staged_dir(out) as staged:
        export(drafter, target_config, staged)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staged / name)
    return out


def __getattr__(name):
    if name in ("export_deepspec", "load_deepspec"):
        from dspark.export import deepspec

        return getattr(deepspec, name)
    raise AttributeError(name)


def load_drafter(export_dir: str | os.PathLike, apply_calibration: bool = True, verifier=None):
    """Rebuild a drafter (weights included) from an export directory in any format dspark writes (deepspec,
    eagle3, speculators, DeepSeek-V4's mtp.*; recognised from its ``config.json`` by ``detect_format``).

    ``verifier`` (a target backend, ``(config, embed_VH, lm_head_VH)`` or a name) supplies the frozen embedding /
    LM head to formats that do not store them (speculators DSpark/DFlash); default: the verifier the export names.
    A ``calibration.json`` beside the weights (written by ``dspark calibrate``) sets the confidence head's per-slot
    temperatures unless ``apply_calibration`` is False; a malformed one, one of the wrong length, or one for a
    drafter without a confidence head is a ValueError.
    """
    from dspark.eval.sts import read_calibration

    drafter = load_exported(export_dir, verifier=verifier)
    temperatures = read_calibration(export_dir, drafter.block_size) if apply_calibration else None
    if temperatures is not None:
        if drafter.confidence_head is None:
            raise ValueError(f"{Path(export_dir) / 'calibration.json'}: drafter {drafter.algorithm} has no "
                             "confidence head to calibrate")
        drafter.set_confidence_temperatures(temperatures)
    return drafter
