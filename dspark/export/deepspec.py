"""The ``deepspec`` attach-on layout (DESIGN section 8): ``config.json`` + ``model.safetensors``.

Tensor names carry no prefix (the reference loader is strict): ``embed_tokens.weight``, ``fc.weight``,
``hidden_norm.weight``, ``layers.{i}.*``, ``norm.weight``, ``lm_head.weight``, ``markov_head.*``,
``confidence_head.proj.*``. ``config.json`` is a Qwen3 config of the draft layers plus the DSpark fields and a
versioned ``dspark`` section (algorithm, block layout, loss weights, layer-id semantics) that this project's
loader reads; a config without it (e.g. from the reference implementation) loads as a DSpark-layout drafter.
Eagle3 drafters (``Qwen3Eagle3Model`` / ``Gemma4Eagle3Model``) are written and read by
``dspark.export.deepspec_eagle3``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dspark.export.common import (
    LAYER_SEMANTICS,
    WEIGHTS_FILE,
    check_tensors,
    gemma4_fields,
    target_fields,
    write_checkpoint,
)

# Version of the "dspark" section of the exported config.json; readers refuse newer versions.
DSPARK_SECTION_VERSION = 1

REQUIRED_CONFIG_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "rms_norm_eps", "rope_parameters", "vocab_size", "num_hidden_layers", "layer_types", "block_size",
    "mask_token_id", "target_layer_ids", "num_anchors", "num_target_layers", "enable_confidence_head",
    "markov_rank", "tie_word_embeddings", "dtype",
)
ARCHITECTURE = "Qwen3DSparkModel"
# Gemma4 targets (DESIGN 8.2): the reference's Gemma4DSparkModel, a Gemma4 text config with the global attention
# geometry at the top level and the target's model types.
GEMMA4_ARCHITECTURE = "Gemma4DSparkModel"
GEMMA4_CONFIG_KEYS = ("global_head_dim", "num_global_key_value_heads", "attention_k_eq_v", "final_logit_softcapping",
                      "target_model_type", "target_text_model_type")


def is_gemma4(config: dict) -> bool:
    return GEMMA4_ARCHITECTURE in (config.get("architectures") or [])


def attention_geometry(config: dict) -> tuple[int, int, bool]:
    """(head dim, kv heads, K = V) of the draft layers: Gemma4's global attention, else the Qwen3 fields."""
    if not is_gemma4(config):
        return config["head_dim"], config["num_key_value_heads"], False
    k_eq_v = bool(config["attention_k_eq_v"])
    kv_heads = config["num_global_key_value_heads"] if k_eq_v else config["num_key_value_heads"]
    return config["global_head_dim"], kv_heads, k_eq_v


def deepspec_config(drafter) -> dict:
    """The deepspec ``config.json`` of a DSpark / DFlash drafter (DESIGN section 8) plus a versioned ``dspark``
    section: the reference's ``Qwen3DSparkModel`` or, on a Gemma4 target, its ``Gemma4DSparkModel`` (DESIGN 8.2:
    the target's text config + the draft fields)."""
    n = len(drafter.layers)
    if drafter.variant.gemma4:
        out = {"architectures": [GEMMA4_ARCHITECTURE], **gemma4_fields(drafter)}
        out.update({"intermediate_size": drafter.intermediate_size, "num_hidden_layers": n,
                    "layer_types": ["full_attention"] * n})
    else:
        out = {"architectures": [ARCHITECTURE], "model_type": "qwen3"}
        out.update({k: v for k, v in target_fields(drafter).items() if v is not None})
        out.update({"intermediate_size": drafter.intermediate_size, "num_hidden_layers": n,
                    "layer_types": ["full_attention"] * n, "max_window_layers": n, "use_sliding_window": False,
                    "sliding_window": None, "attention_bias": False, "attention_dropout": 0.0,
                    "hidden_act": "silu"})
    cfg = drafter.cfg
    out.update({
        # In the DFlash layout the block fed to the model holds the anchor plus K masks (DFlash convention).
        "block_size": drafter.block_len,
        "mask_token_id": drafter.mask_token_id,
        "target_layer_ids": list(drafter.layer_ids),
        "num_anchors": cfg.num_anchors,
        "num_target_layers": drafter.num_target_layers,
        "enable_confidence_head": drafter.confidence_head is not None,
        "markov_rank": drafter.markov_rank,
        "tie_word_embeddings": False,
        "dtype": str(drafter.fc.weight.dtype).removeprefix("torch."),
    })
    if drafter.confidence_head is not None:
        out["confidence_head_with_markov"] = drafter.confidence_head.with_markov
    if drafter.markov_rank > 0:
        out["markov_head_type"] = drafter.markov_head.kind
    out["dspark"] = {
        "format_version": DSPARK_SECTION_VERSION,
        "algorithm": drafter.algorithm,
        "dflash_layout": drafter.dflash_layout,
        "layer_semantics": LAYER_SEMANTICS,
        "loss_decay": cfg.loss_decay,
        "ce_weight": cfg.dspark.ce_weight,
        "l1_weight": cfg.dspark.l1_weight,
        "bce_weight": cfg.dspark.bce_weight,
    }
    return out


def expected_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a deepspec checkpoint with ``config`` must hold, with its ``[out, in]`` shape."""
    V, H = config["vocab_size"], config["hidden_size"]
    heads = config["num_attention_heads"]
    D, kv_heads, k_eq_v = attention_geometry(config)
    inter, r, L = config["intermediate_size"], config["markov_rank"], len(config["target_layer_ids"])
    shapes = {"embed_tokens.weight": (V, H), "fc.weight": (H, L * H), "hidden_norm.weight": (H,),
              "norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (heads * D, H), p + "self_attn.k_proj.weight": (kv_heads * D, H),
            p + "self_attn.v_proj.weight": (kv_heads * D, H), p + "self_attn.o_proj.weight": (H, heads * D),
            p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
            p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
            p + "mlp.down_proj.weight": (H, inter),
        })
        if is_gemma4(config):  # sandwich norms, the layer scalar; no v_proj when K = V
            shapes.update({p + "pre_feedforward_layernorm.weight": (H,), p + "post_feedforward_layernorm.weight": (H,),
                           p + "layer_scalar": (1,)})
            if k_eq_v:
                del shapes[p + "self_attn.v_proj.weight"]
    if r > 0:
        shapes.update({"markov_head.markov_w1.weight": (V, r), "markov_head.markov_w2.weight": (V, r)})
        kind = config.get("markov_head_type", "vanilla")
        if kind == "gated":
            shapes.update({"markov_head.gate_proj.weight": (r, H + r), "markov_head.gate_proj.bias": (r,)})
        elif kind == "rnn":
            shapes.update({"markov_head.joint_proj.weight": (3 * r, 2 * r + H),
                           "markov_head.joint_proj.bias": (3 * r,)})
        elif kind != "vanilla":
            raise ValueError(f"markov_head_type {kind!r} unknown; expected vanilla, gated or rnn")
    if config["enable_confidence_head"]:
        width = H + (r if config.get("confidence_head_with_markov", r > 0) else 0)
        shapes.update({"confidence_head.proj.weight": (1, width), "confidence_head.proj.bias": (1,)})
    return shapes


def _check_config(config: dict, where: str) -> None:
    required = REQUIRED_CONFIG_KEYS + (GEMMA4_CONFIG_KEYS if is_gemma4(config) else ())
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{where}: deepspec config lacks required key(s) {', '.join(missing)}")
    if not {ARCHITECTURE, GEMMA4_ARCHITECTURE} & set(config.get("architectures") or []):
        raise ValueError(f"{where}: architectures {config.get('architectures')} is not [{ARCHITECTURE!r}] "
                         f"(or [{GEMMA4_ARCHITECTURE!r}] for a Gemma4 target)")
    if config["markov_rank"] > 0 and "markov_head_type" not in config:
        raise ValueError(f"{where}: markov_rank {config['markov_rank']} > 0 needs markov_head_type")


def _check_tensors(tensors: dict[str, torch.Tensor], config: dict, where: str) -> None:
    check_tensors(tensors, expected_tensor_shapes(config), "deepspec", where,
                  frozen=("embed_tokens.weight", "lm_head.weight"))


def export_deepspec(drafter, target_config, out_dir: str | os.PathLike) -> Path:
    """Write ``drafter`` as a deepspec attach-on checkpoint into ``out_dir``; returns the directory.

    ``target_config`` (the target's HF config, object or dict; None to skip) is checked against the drafter's
    dims (a re-export of a loaded drafter has no target at hand). Files
    are written under temporary names and renamed, so a reader never sees a half-written checkpoint.
    """
    from dspark.drafters.common import config_get

    if getattr(drafter, "algorithm", None) == "eagle3":
        from dspark.export.deepspec_eagle3 import export_deepspec_eagle3

        return export_deepspec_eagle3(drafter, target_config, out_dir)
    config = deepspec_config(drafter)
    for key in ("hidden_size", "vocab_size") if target_config is not None else ():
        if config_get(target_config, key) != config[key]:
            raise ValueError(f"drafter {key} {config[key]} does not match the target config's "
                             f"{config_get(target_config, key)}")
    out = Path(out_dir)
    _check_config(config, str(out))
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in drafter.full_state_dict().items()}
    _check_tensors(tensors, config, str(out))
    return write_checkpoint(out, tensors, config)


def drafter_config_from_deepspec(config: dict):
    """The ``DrafterConfig`` a deepspec ``config.json`` describes."""
    section = config.get("dspark") or {}
    version = section.get("format_version", DSPARK_SECTION_VERSION)
    if version > DSPARK_SECTION_VERSION:
        raise ValueError(f"deepspec config 'dspark' section has format_version {version}; this dspark reads "
                         f"versions up to {DSPARK_SECTION_VERSION} (upgrade dspark)")
    dflash_layout = bool(section.get("dflash_layout", False))
    return block_drafter_config(
        section.get("algorithm", "dspark"), section, num_layers=config["num_hidden_layers"],
        block_size=config["block_size"] - int(dflash_layout), mask_token_id=config["mask_token_id"],
        dflash_layout=dflash_layout, num_anchors=config["num_anchors"], intermediate_size=config["intermediate_size"],
        markov_rank=config["markov_rank"], markov_head_type=config.get("markov_head_type", "vanilla"),
        enable_confidence_head=config["enable_confidence_head"])


def block_drafter_config(algorithm: str, section: dict, *, markov_rank: int, markov_head_type: str,
                         enable_confidence_head: bool, **shared):
    """The ``DrafterConfig`` of an exported DSpark / DFlash drafter: ``shared`` fields, the heads, and the loss
    settings of the export's ``dspark`` section (defaults where it has none). A DFlash drafter has no
    ``drafter.dspark`` section (it trains without the heads)."""
    from dspark.config import DrafterConfig, DSparkConfig

    defaults = DrafterConfig()
    shared["loss_decay"] = section.get("loss_decay", defaults.loss_decay)
    if algorithm == "dflash":
        return DrafterConfig(algorithm=algorithm, **shared)
    heads = DSparkConfig(markov_rank=markov_rank, markov_head_type=markov_head_type,
                         enable_confidence_head=enable_confidence_head,
                         **{k: section.get(k, getattr(defaults.dspark, k)) for k in ("ce_weight", "l1_weight",
                                                                                     "bce_weight")})
    return DrafterConfig(algorithm=algorithm, dspark=heads, **shared)


def load_deepspec(export_dir: str | os.PathLike):
    """Rebuild the drafter stored in a deepspec directory (strict: every tensor must be present, none extra)."""
    from safetensors.torch import load_file

    from dspark.drafters import build_drafter

    path = Path(export_dir)
    config_path, weights_path = path / "config.json", path / WEIGHTS_FILE
    for f in (config_path, weights_path):
        if not f.is_file():
            raise ValueError(f"{path} is not a deepspec export: {f.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    from dspark.export.deepspec_eagle3 import is_eagle3, load_deepspec_eagle3

    if is_eagle3(config):
        return load_deepspec_eagle3(path)
    _check_config(config, str(path))
    tensors = load_file(str(weights_path))
    _check_tensors(tensors, config, str(path))
    cfg = drafter_config_from_deepspec(config)
    embed_VH, lm_head_VH = tensors.pop("embed_tokens.weight"), tensors.pop("lm_head.weight")
    drafter = build_drafter(cfg, config, config["target_layer_ids"], embed_VH, lm_head_VH)
    drafter.to(tensors["fc.weight"].dtype)
    drafter.load_state_dict(tensors, strict=True)
    return drafter
