"""Projected cache size for a target before building it (``dspark cache estimate``).

Per token, DeepSpec's uncompressed layout stores an int32 token id, 1-2 uint8 masks, bf16 features of the L
feature layers ``[L*H]`` and the bf16 final hidden state ``[H]``: ``4 + masks + 2*L*H + 2*H`` bytes (30.7 KB for
Qwen3-4B, H=2560, 5 layers). Ours stores the id and one mask uncompressed and the two bf16 fields through the
codec, so its size is ``4 + 1 + (2*L*H + 2*H) / ratio``, with the codec's ratio vs raw bf16 taken from
``benchmarks/results/cache_codecs.json`` (measured on real hidden states) when present, else from
``DEFAULT_RATIOS`` (labelled as assumed). Per-sample index entries (~200 bytes of JSON each) are not counted.
Pure arithmetic on JSON files: no torch, no model loading.
"""

from __future__ import annotations

import json
from pathlib import Path

MEASURED_RATIOS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cache_codecs.json"

# Used only when no measurement is available; close to what benchmarks/cache_codecs.py measured on SmolLM2.
DEFAULT_RATIOS = {"raw": 1.0, "bf16": 1.4, "fp8": 2.3}

# name: (hidden_size, decoder layers, default feature layer ids). Qwen3 and Gemma4 ids follow DESIGN.md; SmolLM2's
# are the shipped recipe's.
BUILTIN_TARGETS = {
    "builtin:smollm2": (576, 30, [1, 8, 15, 22, 28]),
    "qwen3-4b": (2560, 36, [1, 9, 17, 25, 33]),
    "qwen3-8b": (4096, 36, [1, 9, 17, 25, 33]),
    "qwen3-14b": (5120, 40, [1, 10, 19, 28, 37]),
    "qwen3-32b": (5120, 64, None),
    "deepseek-v3": (7168, 61, None),
    # Gemma4-12B's text decoder: the gemma4_12b_* recipes' ids (DESIGN 8.2); the reference layout is ~46 KB/token.
    "gemma4-12b": (3840, 48, [5, 17, 29, 41, 46]),
    "qwen3-30b-a3b": (2048, 48, None),
    "qwen3-235b-a22b": (4096, 94, None),
}
_ALIASES = {"smollm2": "builtin:smollm2", "smollm2-135m-instruct": "builtin:smollm2"}


def default_layer_ids(num_target_layers: int, count: int = 5) -> list[int]:
    """``count`` ids from layer 1 in even steps, clear of the last layers (Qwen3-4B: [1, 9, 17, 25, 33])."""
    if count < 1 or num_target_layers < count + 1:
        raise ValueError(f"cannot pick {count} feature layers from a target with {num_target_layers} layers")
    step = max(1, (num_target_layers - 4) // max(1, count - 1))
    ids = [1 + k * step for k in range(count)]
    if ids[-1] >= num_target_layers - 1:  # shallow targets: fall back to consecutive layers
        ids = list(range(1, count + 1))
    return ids


def resolve_target(target: str) -> dict:
    """Shape of ``target``: a builtin name (see ``BUILTIN_TARGETS``), a local HF model dir or its config.json."""
    key = _ALIASES.get(target.lower(), target.lower())
    if key in BUILTIN_TARGETS:
        hidden, layers, ids = BUILTIN_TARGETS[key]
        return {"name": key, "hidden_size": hidden, "num_target_layers": layers, "layer_ids": ids}
    path = Path(target)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ValueError(f"--target {target!r} is neither a builtin name ({', '.join(BUILTIN_TARGETS)}) nor a "
                         f"local HF model directory / config.json")
    config = json.loads(config_path.read_text())
    config = config.get("text_config", config) if "hidden_size" not in config else config
    missing = [key for key in ("hidden_size", "num_hidden_layers") if key not in config]
    if missing:
        raise ValueError(f"{config_path} has no {missing}: not a decoder-model config")
    return {"name": config_path.parent.name, "hidden_size": int(config["hidden_size"]),
            "num_target_layers": int(config["num_hidden_layers"]), "layer_ids": None}


def codec_ratio(codec: str, zstd_level: int, ratios_path: Path | None = None) -> tuple[float, str]:
    """(ratio vs raw bf16 of the feature fields, where it comes from) for ``codec`` at ``zstd_level``."""
    if codec not in DEFAULT_RATIOS:
        raise ValueError(f"unknown cache codec {codec!r}; expected one of: {', '.join(sorted(DEFAULT_RATIOS))}")
    if codec == "raw":
        return 1.0, "exact (uncompressed)"
    path = Path(ratios_path) if ratios_path is not None else MEASURED_RATIOS
    rows = []
    if path.is_file():
        measured = json.loads(path.read_text())
        rows = [row for row in measured.get("codecs", []) if row.get("codec") == codec]
    if not rows:
        return DEFAULT_RATIOS[codec], f"default ratio (assumed, not measured: no {codec} row in {path})"
    row = min(rows, key=lambda r: (abs(r["zstd_level"] - zstd_level), r["zstd_level"]))
    source = (f"measured in {path.name} on {measured.get('target')} (H={measured.get('hidden_size')}), "
              f"zstd level {row['zstd_level']}")
    return float(row["ratio_vs_raw_bf16"]), source


def estimate(*, num_tokens: int, target: str | None = None, hidden_size: int | None = None,
             num_layers: int | None = None, layer_ids: list[int] | None = None, **kwargs) -> dict:
    """``estimate_cache_size`` for a target given by name/config (``target``) or by shape (``hidden_size``).

    Layer ids: ``layer_ids`` if given, else the target's defaults (``num_layers`` of them, default 5). Without a
    target only their count matters (``num_layers``, or the length of ``layer_ids``).
    """
    if (target is None) == (hidden_size is None):
        raise ValueError("give either a target (builtin name or HF config) or --hidden-size, not both or neither")
    if num_layers is not None and layer_ids is not None and num_layers != len(layer_ids):
        raise ValueError(f"--num-layers {num_layers} contradicts --layer-ids {layer_ids} ({len(layer_ids)} ids)")
    if target is None:
        count = len(layer_ids) if layer_ids else (num_layers or 5)
        return estimate_cache_size(hidden_size=hidden_size, num_feature_layers=count, layer_ids=layer_ids,
                                   num_tokens=num_tokens, **kwargs)
    shape = resolve_target(target)
    depth = shape["num_target_layers"]
    if layer_ids is None:
        use_builtin = shape["layer_ids"] is not None and num_layers in (None, len(shape["layer_ids"]))
        layer_ids = shape["layer_ids"] if use_builtin else default_layer_ids(depth, num_layers or 5)
    if any(not -1 <= i < depth for i in layer_ids):
        raise ValueError(f"layer ids {layer_ids} must lie in -1..{depth - 1} for {shape['name']} ({depth} layers; "
                         f"-1 = embeddings, {depth - 1} = the last layer before the final norm)")
    return estimate_cache_size(hidden_size=shape["hidden_size"], num_feature_layers=len(layer_ids),
                               layer_ids=layer_ids, num_tokens=num_tokens, target=shape["name"], **kwargs)


def estimate_cache_size(*, hidden_size: int, num_feature_layers: int, num_tokens: int,
                        layer_ids: list[int] | None = None, codec: str = "bf16", zstd_level: int = 3,
                        mask_bytes: int = 1, target: str = "custom", ratios_path: Path | None = None) -> dict:
    """Bytes per token and in total: DeepSpec's raw layout next to this cache with ``codec``."""
    if hidden_size < 1 or num_feature_layers < 1 or num_tokens < 0 or mask_bytes not in (1, 2):
        raise ValueError(f"need hidden_size >= 1, num_feature_layers >= 1, num_tokens >= 0 and mask_bytes 1 or 2; "
                         f"got {hidden_size}, {num_feature_layers}, {num_tokens}, {mask_bytes}")
    L, H = num_feature_layers, hidden_size
    ratio, source = codec_ratio(codec, zstd_level, ratios_path)
    feature_bytes = 2 * L * H + 2 * H
    raw_per_token = 4 + mask_bytes + feature_bytes
    ours_per_token = 4 + 1 + feature_bytes / ratio
    return {
        "target": target, "hidden_size": H, "num_feature_layers": L,
        "layer_ids": list(layer_ids) if layer_ids is not None else None, "num_tokens": num_tokens,
        "codec": codec, "zstd_level": zstd_level if codec != "raw" else None,
        "deepspec_raw": {
            "bytes_per_token": raw_per_token,
            "breakdown": {"input_ids": 4, "masks": mask_bytes, "features_LH": 2 * L * H, "final_H": 2 * H},
            "total_bytes": raw_per_token * num_tokens,
        },
        "dspark": {
            "bytes_per_token": round(ours_per_token, 1),
            "total_bytes": round(ours_per_token * num_tokens),
            "ratio_vs_raw_bf16": round(ratio, 3),
            "ratio_source": source,
        },
    }


def human_bytes(n: float) -> str:
    """Decimal units, as disk sizes are quoted (30725 -> '30.7 KB')."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_estimate(est: dict) -> str:
    raw, ours = est["deepspec_raw"], est["dspark"]
    level = f", zstd {est['zstd_level']}" if est["zstd_level"] is not None else ""
    layers = f"layer ids {est['layer_ids']}" if est["layer_ids"] else f"{est['num_feature_layers']} feature layers"
    parts = " + ".join(f"{v} {k}" for k, v in raw["breakdown"].items())
    head = f"target {est['target']}: H={est['hidden_size']}, {layers}, {est['num_tokens']:,} tokens"
    raw_line = f"  DeepSpec raw: {human_bytes(raw['bytes_per_token'])}/token (bytes: {parts})"
    ours_line = f"  dspark {est['codec']}{level}: {human_bytes(ours['bytes_per_token'])}/token"
    return "\n".join([
        head,
        f"{raw_line} -> {human_bytes(raw['total_bytes'])}",
        f"{ours_line} -> {human_bytes(ours['total_bytes'])} (features {ours['ratio_vs_raw_bf16']}x smaller)",
        f"  ratio source: {ours['ratio_source']}",
    ])
