"""Which model families (HF ``model_type``) each parallel backend can host.

One row per family; each row maps a backend name to a short note on what it supports. A backend adds itself
by adding its key to the rows it handles (and a row for a new family). ``hf`` is not listed: it hosts
anything transformers can load, in one process.
"""

from __future__ import annotations

FAMILIES: dict[str, dict[str, str]] = {
    "llama": {"zero3": "features; decoding in lockstep; generate",
              "pipeline": "features; decoding in lockstep; generate",
              "megatron": "tensor parallel; features; decoding in lockstep; generate"},
    "qwen3": {"zero3": "features; decoding in lockstep; generate",
              "pipeline": "features; decoding in lockstep; generate",
              "megatron": "tensor parallel; features; decoding in lockstep; generate"},
    "deepseek_v3": {"zero3": "features (MLA + MoE, fused experts); decoding in lockstep; generate",
                    "pipeline": "features (MLA + MoE); decoding in lockstep; generate",
                    "megatron": "MLA tensor parallel by heads, MoE experts split over the TP ranks; features; "
                                "decoding in lockstep; generate"},
    "deepseek_v4": {"zero3": "features (hidden states carry the mHC streams: [B, T, L, hc, H]); decoding in "
                    "lockstep (rollback by snapshot and replay: the sliding-window and compressor caches cannot "
                    "crop); generate",
                    "pipeline": "features ([B, T, L, hc, H], token ids and rotary tables on every stage); decoding "
                                "in lockstep (rollback by snapshot and replay on every stage: the compressor state "
                                "cannot crop); generate",
                    "megatron": "query heads, sinks and output groups tensor parallel (the shared KV head, "
                                "compressors, indexer and mHC replicated), MoE experts split over the TP ranks; "
                                "features ([B, T, L, hc, H]); decoding in lockstep (rollback by snapshot and replay); "
                                "generate"},
    "qwen3_moe": {"megatron": "tensor parallel by heads, MoE experts split over the TP ranks; features; decoding in "
                              "lockstep; generate"},
}


def supported_families(backend: str) -> list[str]:
    return sorted(family for family, backends in FAMILIES.items() if backend in backends)


def require_family(model_type: str, backend: str, source: str = "") -> None:
    """Refuse a family ``backend`` cannot host, naming the ones it can (before any weight is read)."""
    if backend not in FAMILIES.get(model_type, {}):
        where = f" ({source})" if source else ""
        raise ValueError(
            f"target.backend={backend} does not support model_type {model_type!r}{where}; "
            f"supported: {', '.join(supported_families(backend))}"
        )
