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
    "qwen3_moe": {"zero3": "features (Qwen3-30B-A3B, Qwen3-235B-A22B: experts fused or per expert as on the hub, "
                           "each rank reading the rows of its own flat range); decoding in lockstep; generate",
                  "pipeline": "features (a stage reads only its layers' experts); decoding in lockstep; generate",
                  "megatron": "tensor parallel by heads, MoE experts split over the TP ranks; features; decoding in "
                              "lockstep; generate"},
    "glm4_moe": {"zero3": "features (GLM-4.5/4.6: partial rotary, q/k/v biases, dense first layers, sigmoid-routed "
                          "experts with shared experts); decoding in lockstep; generate",
                 "pipeline": "features; decoding in lockstep; generate",
                 "megatron": "tensor parallel by heads (q/k/v biases split with their rows), MoE experts split over "
                             "the TP ranks; features; decoding in lockstep; generate"},
    # Gemma4 text decoders (dense: no per-layer input embeddings, no MoE block, no KV shared across layers on
    # pipeline). gemma4 and gemma4_unified are the multimodal checkpoints: only their text decoder is hosted.
    **{model_type: {"zero3": "features (sliding and global layers, softcapped logits); decoding in lockstep "
                             "(rollback by snapshot and replay: sliding-window caches cannot crop); generate",
                    "pipeline": "features (a mask and rotary table per layer type on every stage); decoding in "
                                "lockstep; generate",
                    "megatron": "tensor parallel by heads (a global layer's KV heads replicated when fewer than the "
                                "ranks), sqrt(H)-scaled vocab-parallel embedding; features; decoding in lockstep "
                                "(rollback by snapshot and replay); generate"}
       for model_type in ("gemma4", "gemma4_text", "gemma4_unified")},
}

# Families a backend does not host yet, with the reason (named in the refusal).
PENDING: dict[tuple[str, str], str] = {}

# Decoder families users ask for that transformers 5.24 has but no sharded backend lists yet, with the reason
# (``hf`` hosts them all in one process). Named in the refusal of any sharded backend.
NOT_YET: dict[str, str] = {
    "qwen3_5": "Qwen3.5 mixes gated-DeltaNet linear-attention layers (a recurrent state and conv cache per layer, "
               "a third mask kind) with full attention: the pipeline stages and the decode rollback need that state "
               "handled and a parity test first",
    "qwen3_5_moe": "as qwen3_5 (linear-attention layers), plus MoE",
    "qwen3_next": "as qwen3_5: gated-DeltaNet linear-attention layers with recurrent state",
}

# Gemma4 settings the sharded backends refuse (field, value the backends need, why), checked on the text config.
GEMMA4_DENSE_ONLY = (
    ("hidden_size_per_layer_input", 0, "per-layer input embeddings (Gemma4 E2B/E4B) are not hosted"),
    ("enable_moe_block", False, "Gemma4's MoE block is not hosted"),
    ("num_kv_shared_layers", 0, "layers reusing an earlier layer's K/V are not hosted"),
)


def supported_families(backend: str) -> list[str]:
    return sorted(family for family, backends in FAMILIES.items() if backend in backends)


def require_family(model_type: str, backend: str, source: str = "") -> None:
    """Refuse a family ``backend`` cannot host, naming the ones it can (before any weight is read)."""
    where = f" ({source})" if source else ""
    if (model_type, backend) in PENDING:
        raise ValueError(f"target.backend={backend} does not support model_type {model_type!r}{where} yet: "
                         f"{PENDING[model_type, backend]}; use target.backend=zero3 or pipeline")
    if model_type in NOT_YET and backend not in FAMILIES.get(model_type, {}):
        raise ValueError(f"target.backend={backend} does not support model_type {model_type!r}{where} yet: "
                         f"{NOT_YET[model_type]}; use target.backend=hf")
    if backend not in FAMILIES.get(model_type, {}):
        raise ValueError(
            f"target.backend={backend} does not support model_type {model_type!r}{where}; "
            f"supported: {', '.join(supported_families(backend))}"
        )


def require_hostable(config, backend: str, source: str = "") -> None:
    """``require_family`` plus the per-model settings a family's row does not cover (Gemma4's dense-only fields,
    read from the text config of a multimodal checkpoint)."""
    require_family(config.model_type, backend, source)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text.model_type not in ("gemma4_text", "gemma4_unified_text"):
        return
    for field, needed, why in GEMMA4_DENSE_ONLY:
        value = getattr(text, field, needed)
        if (value or 0) != (needed or 0):
            where = f" ({source})" if source else ""
            raise ValueError(f"target.backend={backend}: {config.model_type}{where} has {field}={value!r}, expected "
                             f"{needed!r}: {why} (the dense Gemma4 models, e.g. Gemma4-12B, are)")


# ``target.family`` of a recipe -> the model_types it accepts (a multimodal Gemma4 checkpoint is a Gemma4 target).
RECIPE_FAMILIES: dict[str, tuple[str, ...]] = {
    "gemma4": ("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text"),
    "qwen3": ("qwen3",),
    "qwen3_moe": ("qwen3_moe",),
    "glm4_moe": ("glm4_moe",),
    "llama": ("llama",),
}


def require_recipe_family(family: str, model_type: str, name: str) -> None:
    """Refuse a target whose ``model_type`` is not of the family ``target.family`` names ("" accepts any)."""
    if not family:
        return
    if family not in RECIPE_FAMILIES:
        raise ValueError(f"target.family {family!r} unknown; expected one of {', '.join(RECIPE_FAMILIES)} or ''")
    if model_type not in RECIPE_FAMILIES[family]:
        raise ValueError(f"target {name} has model_type {model_type!r} but the recipe is for {family} targets "
                         f"(target.family={family}: its layer ids and mask token fit {family} only); use a "
                         f"{model_type} recipe, or --set target.family='' to override")
