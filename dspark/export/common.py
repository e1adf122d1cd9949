"""What every attach-on exporter shares: the draft layers' config fields taken from the target, the tensor check
against a layout and the atomic write of a directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"
# Exports are handed to serving engines that often run as another user: world-readable files and folders.
FILE_MODE, DIR_MODE = 0o644, 0o755
# How the feature layer ids of an export's "dspark" section read.
LAYER_SEMANTICS = "id i = output of decoder layer i (HF hidden_states[i+1]); -1 = embeddings"
# Target config fields copied into an exported config.json (a Qwen3 / Llama config describing the draft layers).
TARGET_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "rms_norm_eps", "rope_parameters", "max_position_embeddings", "initializer_range",
                 "bos_token_id", "eos_token_id", "pad_token_id")


def target_fields(drafter) -> dict:
    """``TARGET_FIELDS`` of the drafter's target config, with the attention geometry and norm epsilon its draft
    layers were built with (a field the target lacks is None)."""
    from dspark.drafters.common import config_get

    fields = {k: config_get(drafter.target_config, k) for k in TARGET_FIELDS}
    fields.update(head_dim=drafter.head_dim, num_key_value_heads=drafter.num_kv_heads,
                  rms_norm_eps=drafter.rms_norm_eps)
    return fields


def gemma4_fields(drafter) -> dict:
    """Every field of a Gemma4 target's text config as the reference's Gemma4 drafters read it (DESIGN 8.2):
    ``global_head_dim`` / ``num_global_key_value_heads`` at the top level (transformers 5.10 reads them there),
    ``rope_parameters`` with its per-layer-type sub-dicts plus the top-level ``rope_type``/``rope_theta`` the
    reference's own save adds, and the target's model types. An exported config (a dict) passes through."""
    config = drafter.target_config
    if isinstance(config, dict):
        fields = {k: v for k, v in config.items() if k not in ("dspark",)}
    else:
        fields = config.to_dict()
        for key in ("per_layer_config", "architectures", "_name_or_path", "transformers_version", "dtype",
                    "torch_dtype"):
            fields.pop(key, None)
    # The reference's Gemma4 targets are the multimodal checkpoints (gemma4 / gemma4_unified) around this text model.
    fields.setdefault("target_text_model_type", fields.get("model_type"))
    fields.setdefault("target_model_type", fields["target_text_model_type"].removesuffix("_text"))
    rope = dict(fields.get("rope_parameters") or {})
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", None)
    fields.update(model_type="gemma4_text", global_head_dim=drafter.head_dim,
                  num_global_key_value_heads=drafter.num_kv_heads, rope_parameters=rope)
    return fields


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


def check_target_dir(out: Path, overwrite: bool) -> None:
    """Refuse an export target that is a file, or a non-empty directory unless ``overwrite`` (which replaces it
    whole): an export never mixes its files with foreign ones."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"export target {out} is a file, expected a directory (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"export target {out} is not empty; pass --overwrite to replace it whole, or name a new "
                         f"directory")


def _replace_dir(staged: Path, out: Path) -> None:
    """Put the finished directory ``staged`` at ``out``, replacing whatever is there (renames, same filesystem)."""
    for root, dirs, files in os.walk(staged):
        os.chmod(root, DIR_MODE)
        for f in files:
            os.chmod(os.path.join(root, f), FILE_MODE)
    if not out.exists():
        os.replace(staged, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / out.name)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike):
    """Yield a path in a fresh temporary directory beside ``out`` (not yet created) to build the export in; when
    the block succeeds that directory replaces ``out`` whole (files 0644), when it fails it is removed and ``out``
    is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield scratch / out.name
        _replace_dir(scratch / out.name, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_checkpoint(out: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into a fresh temporary directory and rename it into place
    (replacing ``out``), so a reader never sees a half-written export or foreign files beside it."""
    from safetensors.torch import save_file

    out = Path(out)
    with staged_dir(out) as staged:
        staged.mkdir()
        save_file(tensors, str(staged / WEIGHTS_FILE), metadata={"format": "pt"})
        (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
