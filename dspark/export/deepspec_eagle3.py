"""The reference's deepspec layout for Eagle3 drafters (DESIGN 8.1, 8.2): ``Qwen3Eagle3Model`` / ``Gemma4Eagle3Model``.

``config.json`` is the target's config with the draft fields: on a Gemma4 target every field of its text config
(``model_type`` gemma4_text, the global attention geometry at the top level, ``target_model_type`` /
``target_text_model_type``; see ``dspark.export.common.gemma4_fields``), otherwise the target's fields as a Qwen3
config; then
``architectures``, ``num_hidden_layers`` = ``draft_num_hidden_layers`` = 1, ``num_target_layers``, ``layer_types``,
``target_model_name_or_path``, ``target_layer_ids``, ``ttt_length``, ``step_loss_decay``, ``tie_word_embeddings:
false``, ``dtype``, plus a versioned ``dspark`` section (block size at decode time, layer-id semantics). The
reference trains with exactly 5 feature layers (its recipes) but sizes ``fc`` from ``target_layer_ids`` when it
loads, so any count of decoder-layer ids (>= 0: its Eagle3 reads no embeddings) is written.

Tensors, no prefix, ``[out, in]``: ``embed_tokens`` and ``lm_head`` ``[V, H]`` (frozen, full vocabulary), ``fc [H,
L*H]``, ``norm [H]``, ``layers.0.{hidden_norm, input_layernorm, post_attention_layernorm}``,
``layers.0.self_attn.{q,k,v}_proj`` reading ``2H``, ``o_proj``, ``q_norm`` / ``k_norm [D]``, ``layers.0.mlp.*``;
Gemma4 adds ``layers.0.{pre,post}_feedforward_layernorm`` and ``layers.0.layer_scalar [1]``, uses the global head
dim and KV heads, and has no ``v_proj`` when ``attention_k_eq_v``. The drafter's ``midlayer.*`` is ``layers.0.*``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dspark.export.common import LAYER_SEMANTICS, check_tensors, gemma4_fields, target_fields, write_checkpoint
from dspark.export.eagle3 import EAGLE3_SECTION_VERSION

QWEN3_ARCHITECTURE = "Qwen3Eagle3Model"
GEMMA4_ARCHITECTURE = "Gemma4Eagle3Model"
ARCHITECTURES = (QWEN3_ARCHITECTURE, GEMMA4_ARCHITECTURE)
REQUIRED_CONFIG_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "rms_norm_eps", "rope_parameters", "vocab_size", "num_hidden_layers", "draft_num_hidden_layers",
    "num_target_layers", "layer_types", "target_model_name_or_path", "target_layer_ids", "ttt_length",
    "step_loss_decay", "tie_word_embeddings",
)
GEMMA4_CONFIG_KEYS = ("global_head_dim", "num_global_key_value_heads", "attention_k_eq_v", "final_logit_softcapping",
                      "target_model_type", "target_text_model_type")
LAYER = "layers.0."


def is_eagle3(config: dict) -> bool:
    """Whether a deepspec ``config.json`` holds an Eagle3 drafter (rather than DSpark / DFlash)."""
    return bool(set(ARCHITECTURES) & set(config.get("architectures") or []))


def _is_gemma4(config: dict) -> bool:
    return GEMMA4_ARCHITECTURE in (config.get("architectures") or [])


def deepspec_eagle3_config(drafter) -> dict:
    """The ``config.json`` of an Eagle3 drafter whose midlayer is the reference's (``drafter.deepspec_layout``)."""
    if drafter.variant.gemma4:
        out = {"architectures": [GEMMA4_ARCHITECTURE], **gemma4_fields(drafter)}
    else:
        out = {"architectures": [QWEN3_ARCHITECTURE], "model_type": "qwen3"}
        out.update({k: v for k, v in target_fields(drafter).items() if v is not None})
        out.update({"max_window_layers": 1, "use_sliding_window": False, "sliding_window": None,
                    "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu"})
    out.update({
        "intermediate_size": drafter.intermediate_size,
        "num_hidden_layers": 1,
        "draft_num_hidden_layers": 1,
        "layer_types": ["full_attention"],
        "num_target_layers": drafter.num_target_layers,
        "target_model_name_or_path": str(drafter.target_name),
        "target_layer_ids": list(drafter.layer_ids),
        "ttt_length": drafter.ttt_length,
        "step_loss_decay": drafter.cfg.eagle3.ttt_decay,
        "tie_word_embeddings": False,
        "dtype": str(drafter.fc.weight.dtype).removeprefix("torch."),
        "dspark": {"format_version": EAGLE3_SECTION_VERSION, "algorithm": "eagle3", "block_size": drafter.block_size,
                   "layer_semantics": LAYER_SEMANTICS},
    })
    return out


def expected_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a deepspec Eagle3 checkpoint with ``config``, with its ``[out, in]`` shape."""
    V, H, heads = config["vocab_size"], config["hidden_size"], config["num_attention_heads"]
    D, kv_heads, k_eq_v = config["head_dim"], config["num_key_value_heads"], False
    if _is_gemma4(config):  # the draft layer uses Gemma4's global attention geometry
        D, k_eq_v = config["global_head_dim"], bool(config["attention_k_eq_v"])
        kv_heads = config["num_global_key_value_heads"] if k_eq_v else kv_heads
    inter, L, p = config["intermediate_size"], len(config["target_layer_ids"]), LAYER
    shapes = {
        "embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "fc.weight": (H, L * H), "norm.weight": (H,),
        p + "hidden_norm.weight": (H,), p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        p + "self_attn.q_proj.weight": (heads * D, 2 * H), p + "self_attn.k_proj.weight": (kv_heads * D, 2 * H),
        p + "self_attn.v_proj.weight": (kv_heads * D, 2 * H), p + "self_attn.o_proj.weight": (H, heads * D),
        p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
        p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
        p + "mlp.down_proj.weight": (H, inter),
    }
    if _is_gemma4(config):
        shapes.update({p + "pre_feedforward_layernorm.weight": (H,), p + "post_feedforward_layernorm.weight": (H,),
                       p + "layer_scalar": (1,)})
        if k_eq_v:
            del shapes[p + "self_attn.v_proj.weight"]
    return shapes


def _check_config(config: dict, where: str) -> None:
    required = REQUIRED_CONFIG_KEYS + (GEMMA4_CONFIG_KEYS if _is_gemma4(config) else ())
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{where}: deepspec Eagle3 config lacks required key(s) {', '.join(missing)}")
    if (config["num_hidden_layers"], config["draft_num_hidden_layers"]) != (1, 1):
        raise ValueError(f"{where}: num_hidden_layers {config['num_hidden_layers']} / draft_num_hidden_layers "
                         f"{config['draft_num_hidden_layers']}; dspark's Eagle3 has exactly one draft layer (1 / 1)")
    ids = config["target_layer_ids"]
    if not ids or min(ids) < 0:
        raise ValueError(f"{where}: target_layer_ids {ids} must be decoder layers (ids >= 0, at least one)")


def _check_tensors(tensors: dict[str, torch.Tensor], config: dict, where: str) -> None:
    check_tensors(tensors, expected_tensor_shapes(config), "deepspec Eagle3", where,
                  frozen=("embed_tokens.weight", "lm_head.weight"))


def export_deepspec_eagle3(drafter, target_config, out_dir: str | os.PathLike) -> Path:
    """Write an Eagle3 drafter with the reference's midlayer as ``Gemma4Eagle3Model`` / ``Qwen3Eagle3Model``;
    ``target_config`` (None to skip) is cross-checked against the drafter's dims."""
    from dspark.export.eagle3 import _check_target

    out = Path(out_dir)
    _check_target(drafter, target_config)
    if not drafter.deepspec_layout:
        from dspark.export.eagle3 import eagle3_config

        raise ValueError(f"this Eagle3 drafter has SGLang/vLLM's Llama midlayer (no q/k norms): it exports as "
                         f"eagle3 (architectures {eagle3_config(drafter)['architectures']}) or speculators, not in "
                         f"the deepspec layout: use --format eagle3 (or train with drafter.eagle3.qk_norm=true "
                         f"for the reference's Qwen3Eagle3Model)")
    config = deepspec_eagle3_config(drafter)
    _check_config(config, str(out))
    tensors = {}
    for name, t in drafter.full_state_dict().items():
        name = LAYER + name.removeprefix("midlayer.") if name.startswith("midlayer.") else name
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    _check_tensors(tensors, config, str(out))
    return write_checkpoint(out, tensors, config)


def load_deepspec_eagle3(export_dir: str | os.PathLike):
    """Rebuild the ``Eagle3Drafter`` of a deepspec Eagle3 directory (strict: every tensor, none extra). A config
    without the ``dspark`` section (the reference's own) drafts ``ttt_length`` tokens per round."""
    from dspark.config import DrafterConfig, Eagle3Config
    from dspark.drafters.eagle3.model import Eagle3Drafter
    from dspark.export.eagle3 import _read

    path = Path(export_dir)
    config, tensors = _read(path)
    _check_config(config, str(path))
    _check_tensors(tensors, config, str(path))
    section = config.get("dspark") or {}
    version = section.get("format_version", EAGLE3_SECTION_VERSION)
    if not isinstance(version, int) or version > EAGLE3_SECTION_VERSION:
        raise ValueError(f"{path}: 'dspark' section format_version {version!r}; this dspark reads versions up to "
                         f"{EAGLE3_SECTION_VERSION}")
    cfg = DrafterConfig(algorithm="eagle3", num_layers=1, block_size=section.get("block_size", config["ttt_length"]),
                        intermediate_size=config["intermediate_size"],
                        eagle3=Eagle3Config(ttt_length=config["ttt_length"], ttt_decay=config["step_loss_decay"],
                                            qk_norm=not _is_gemma4(config)))
    embed, lm_head = tensors.pop("embed_tokens.weight"), tensors.pop("lm_head.weight")
    drafter = Eagle3Drafter(cfg, config, config["target_layer_ids"], embed, lm_head)
    drafter.to(tensors["fc.weight"].dtype)
    drafter.load_state_dict({("midlayer." + k.removeprefix(LAYER) if k.startswith(LAYER) else k): v
                             for k, v in tensors.items()}, strict=True)
    return drafter
