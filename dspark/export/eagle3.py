"""Eagle3 attach-on layouts (DESIGN section 8): SGLang/vLLM ``LlamaForCausalLMEagle3`` and vLLM speculators.

Both are ``config.json`` + ``model.safetensors`` with tensor names without prefix:
- ``eagle3`` (``LlamaForCausalLMEagle3``): ``fc.weight [H, L*H]``, ``midlayer.{input_layernorm, hidden_norm,
  post_attention_layernorm}.weight``, ``midlayer.self_attn.{q,k,v}_proj.weight [.., 2H]``,
  ``midlayer.self_attn.o_proj.weight``, ``midlayer.mlp.{gate,up,down}_proj.weight``, ``norm.weight``,
  ``embed_tokens.weight [V, H]``, ``lm_head.weight [W, H]``, and when the draft vocab is pruned ``d2t [W]``
  (int64 offsets: target id = draft id + d2t) and ``t2d [V]`` (bool). Config: a Llama config of the one draft
  layer with ``draft_vocab_size``, ``target_hidden_size`` and the feature layer ids twice, once per engine:
  ``eagle_config.eagle_aux_hidden_state_layer_ids`` in SGLang's convention ("output of decoder layer i": it
  captures the input of layer i + 1; this project's convention, written unchanged) and a top-level
  ``eagle_aux_hidden_state_layer_ids`` in vLLM's (id j = the input of layer j: our ids + 1; vLLM reads the
  top-level list first). Both engines size ``fc`` as ``3 * target_hidden_size``, so this layout takes exactly
  ``ENGINE_FEATURE_LAYERS`` (3) feature layers; other counts go to the speculators format.
- speculators (``speculators_model_type: eagle3``): the same tensors with ``layers.0.`` instead of
  ``midlayer.``, a nested ``transformer_layer_config``, ``speculators_config`` (proposal method, verifier),
  ``norm_before_residual: false`` (our residual is the un-normed hidden input) and a top-level
  ``eagle_aux_hidden_state_layer_ids`` in vLLM's indexing, where id j is the hidden state entering layer j
  (the output of layer j - 1; 0 = embeddings): our ids + 1.
Both configs carry a versioned ``dspark`` section (TTT settings, layer-id semantics) that the loaders read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dspark.export.common import LAYER_SEMANTICS, WEIGHTS_FILE, check_tensors, target_fields, write_checkpoint

# Version of the "dspark" section of the exported config.json (eagle3, speculators and deepspec Eagle3 layouts);
# readers refuse newer versions.
EAGLE3_SECTION_VERSION = 1
ARCHITECTURE = "LlamaForCausalLMEagle3"
SPECULATORS_ARCHITECTURE = "Eagle3Speculator"
SPECULATORS_VERSION = "0.9.0"
# SGLang's and vLLM's LlamaForCausalLMEagle3 build fc as [H, 3 * target_hidden_size].
ENGINE_FEATURE_LAYERS = 3
# Formats that hold an Eagle3 drafter with any number of feature layers.
ANY_LAYER_COUNT_FORMATS = ("speculators",)
REQUIRED_CONFIG_KEYS = (
    "architectures", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "rope_theta", "vocab_size", "draft_vocab_size", "num_hidden_layers", "eagle_config", "dspark",
)
REQUIRED_SPECULATORS_KEYS = ("speculators_model_type", "speculators_config", "transformer_layer_config",
                             "draft_vocab_size", "eagle_aux_hidden_state_layer_ids", "dspark")


def _check_drafter(drafter, where: str) -> None:
    if getattr(drafter, "algorithm", None) != "eagle3":
        raise ValueError(f"{where}: the eagle3 layout holds only Eagle3 drafters, got algorithm "
                         f"{getattr(drafter, 'algorithm', type(drafter).__name__)!r} (export it as deepspec)")
    if drafter.deepspec_layout:
        layer = "Gemma4's layer" if drafter.variant.gemma4 else "q/k norms (drafter.eagle3.qk_norm)"
        raise ValueError(f"{where}: this Eagle3 drafter's midlayer has {layer}, which the Llama midlayer of the "
                         f"eagle3 and speculators layouts cannot hold; export it with --format deepspec (the "
                         f"reference's {'Gemma4' if drafter.variant.gemma4 else 'Qwen3'}Eagle3Model)")


def _llama_fields(drafter) -> dict:
    """The Llama config of the one draft layer (HF names)."""
    tf = target_fields(drafter)
    rope = tf.get("rope_parameters") or {}
    attn = drafter.midlayer.self_attn
    fields = {
        "model_type": "llama",
        "hidden_size": drafter.hidden_size,
        "intermediate_size": drafter.intermediate_size,
        "num_attention_heads": attn.num_heads,
        "num_key_value_heads": attn.num_kv_heads,
        "head_dim": attn.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": tf["rms_norm_eps"],
        "rope_theta": drafter.rotary.theta,
        "rope_scaling": None,
        "max_position_embeddings": tf.get("max_position_embeddings"),
        "vocab_size": drafter.vocab_size,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "dtype": str(drafter.fc.weight.dtype).removeprefix("torch."),
    }
    if isinstance(rope, dict) and rope:
        fields["rope_parameters"] = rope
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range"):
        if tf.get(key) is not None:
            fields[key] = tf[key]
    return fields


def _dspark_section(drafter) -> dict:
    return {"format_version": EAGLE3_SECTION_VERSION, "algorithm": "eagle3", "layer_ids": list(drafter.layer_ids),
            "layer_semantics": LAYER_SEMANTICS, "num_target_layers": drafter.num_target_layers,
            "block_size": drafter.block_size, "ttt_length": drafter.ttt_length,
            "ttt_decay": drafter.cfg.eagle3.ttt_decay}


def eagle3_config(drafter) -> dict:
    """The ``LlamaForCausalLMEagle3`` ``config.json`` of ``drafter``."""
    config = {"architectures": [ARCHITECTURE], **_llama_fields(drafter)}
    config.update({
        "draft_vocab_size": drafter.draft_vocab_size,
        "target_hidden_size": drafter.hidden_size,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(drafter.layer_ids), "use_aux_hidden_state": True},
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in drafter.layer_ids],  # vLLM: input of layer j
        "dspark": _dspark_section(drafter),
    })
    return config


def expected_tensor_shapes(config: dict, layer_prefix: str = "midlayer.") -> dict[str, tuple[int, ...]]:
    """Every tensor of an Eagle3 checkpoint described by a Llama-style draft ``config`` (plus its ``dspark``)."""
    V, W, H = config["vocab_size"], config["draft_vocab_size"], config["hidden_size"]
    heads, kv_heads, D = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    inter, L = config["intermediate_size"], len(config["dspark"]["layer_ids"])
    p = layer_prefix
    shapes = {
        "embed_tokens.weight": (V, H), "lm_head.weight": (W, H), "fc.weight": (H, L * H), "norm.weight": (H,),
        p + "input_layernorm.weight": (H,), p + "hidden_norm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        p + "self_attn.q_proj.weight": (heads * D, 2 * H), p + "self_attn.k_proj.weight": (kv_heads * D, 2 * H),
        p + "self_attn.v_proj.weight": (kv_heads * D, 2 * H), p + "self_attn.o_proj.weight": (H, heads * D),
        p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
        p + "mlp.down_proj.weight": (H, inter),
    }
    if W < V:
        shapes.update({"d2t": (W,), "t2d": (V,)})
    return shapes


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    check_tensors(tensors, expected, "Eagle3", where, frozen=("embed_tokens.weight", "lm_head.weight"))
    if "d2t" in tensors and (tensors["d2t"].dtype != torch.int64 or tensors["t2d"].dtype != torch.bool):
        raise ValueError(f"{where}: d2t must be int64 and t2d bool, got {tensors['d2t'].dtype} and "
                         f"{tensors['t2d'].dtype}")


def _write(out: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    return write_checkpoint(out, tensors, config)


def _drafter_tensors(drafter, layer_prefix: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, t in drafter.full_state_dict().items():
        name = layer_prefix + name.removeprefix("midlayer.") if name.startswith("midlayer.") else name
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    return tensors


def _check_target(drafter, target_config) -> None:
    from dspark.drafters.common import config_get

    for key, mine in (("hidden_size", drafter.hidden_size), ("vocab_size", drafter.vocab_size)):
        if target_config is not None and config_get(target_config, key) != mine:
            raise ValueError(f"drafter {key} {mine} does not match the target config's "
                             f"{config_get(target_config, key)}")


def check_engine_layers(drafter, where: str) -> None:
    """Refuse a drafter whose feature-layer count SGLang/vLLM's ``LlamaForCausalLMEagle3`` cannot load."""
    count = len(drafter.layer_ids)
    if count != ENGINE_FEATURE_LAYERS:
        raise ValueError(f"{where}: --format eagle3 (SGLang/vLLM LlamaForCausalLMEagle3) takes exactly "
                         f"{ENGINE_FEATURE_LAYERS} feature layers, this drafter has {count} {list(drafter.layer_ids)}; "
                         f"formats that take {count}: {', '.join(ANY_LAYER_COUNT_FORMATS)} (or train a 3-layer "
                         f"recipe, e.g. *_eagle3_serve)")
    if any(i < 0 for i in drafter.layer_ids):
        # vLLM captures hidden_states + residual entering layer id + 1; before layer 0 there is no residual, so the
        # embeddings (our id -1) cannot be captured there. The last layer (id L-1) has no next layer to capture at
        # either; the Eagle3 drafter itself refuses it.
        raise ValueError(f"{where}: --format eagle3 takes feature layer ids >= 0 (vLLM captures the input of layer "
                         f"id + 1 as hidden_states + residual); {list(drafter.layer_ids)} holds -1 (the embeddings); "
                         f"formats that take it: {', '.join(ANY_LAYER_COUNT_FORMATS)}")


def export_eagle3(drafter, target_config, out_dir: str | os.PathLike, engine_layers: bool = True) -> Path:
    """Write ``drafter`` in the SGLang/vLLM ``LlamaForCausalLMEagle3`` layout; returns the directory.

    ``target_config`` (HF config or dict; None to skip) is cross-checked against the drafter's dims.
    ``engine_layers=False`` lifts the 3-feature-layer rule, for the trainer's own ``<run>/drafter`` copy that only
    dspark reads back (``load_drafter``); exports for engines keep it.
    """
    out = Path(out_dir)
    _check_drafter(drafter, str(out))
    if engine_layers:
        check_engine_layers(drafter, str(out))
    _check_target(drafter, target_config)
    config = eagle3_config(drafter)
    tensors = _drafter_tensors(drafter, "midlayer.")
    _check_tensors(tensors, expected_tensor_shapes(config), str(out))
    return _write(out, config, tensors)


def export_speculators_eagle3(drafter, target_config, out_dir: str | os.PathLike) -> Path:
    """Write ``drafter`` in vLLM speculators' eagle3 form (any number of feature layers: ``fc`` is sized from
    them); ``target_config`` names the verifier (engine-loadable ``_name_or_path`` and ``architectures``)."""
    out = Path(out_dir)
    _check_drafter(drafter, str(out))
    _check_target(drafter, target_config)
    from dspark.export.verifier import verifier_fields

    layer = _llama_fields(drafter)
    verifier = verifier_fields(target_config, str(out))
    config = {
        "architectures": [SPECULATORS_ARCHITECTURE],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": drafter.block_size,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": verifier,
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": drafter.draft_vocab_size,
        "target_hidden_size": drafter.hidden_size,
        "norm_before_residual": False,
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in drafter.layer_ids],
        "tie_word_embeddings": False,
        "dtype": layer["dtype"],
        "dspark": _dspark_section(drafter),
    }
    tensors = _drafter_tensors(drafter, "layers.0.")
    _check_tensors(tensors, expected_tensor_shapes({**layer, "draft_vocab_size": drafter.draft_vocab_size,
                                                    "dspark": config["dspark"]}, "layers.0."), str(out))
    return _write(out, config, tensors)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_path, weights_path = path / "config.json", path / WEIGHTS_FILE
    for f in (config_path, weights_path):
        if not f.is_file():
            raise ValueError(f"{path} is not an Eagle3 export: {f.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    return config, load_file(str(weights_path))


def _build(layer: dict, section: dict, tensors: dict[str, torch.Tensor], layer_prefix: str, where: str):
    from dspark.config import DrafterConfig, Eagle3Config
    from dspark.drafters.eagle3.model import Eagle3Drafter

    version = section.get("format_version")
    if not isinstance(version, int) or version > EAGLE3_SECTION_VERSION:
        raise ValueError(f"{where}: 'dspark' section format_version {version!r}; this dspark reads versions up to "
                         f"{EAGLE3_SECTION_VERSION}")
    _check_tensors(tensors, expected_tensor_shapes({**layer, "dspark": section}, layer_prefix), where)
    V, W = layer["vocab_size"], layer["draft_vocab_size"]
    cfg = DrafterConfig(algorithm="eagle3", num_layers=1, block_size=section["block_size"],
                        intermediate_size=layer["intermediate_size"],
                        eagle3=Eagle3Config(ttt_length=section["ttt_length"], ttt_decay=section["ttt_decay"],
                                            draft_vocab_size=W if W < V else 0))
    target = {**layer, "num_target_layers": section["num_target_layers"]}
    embed, lm_head = tensors.pop("embed_tokens.weight"), tensors.pop("lm_head.weight")
    maps = {"d2t": tensors.pop("d2t"), "t2d": tensors.pop("t2d")} if W < V else {}
    drafter = Eagle3Drafter(cfg, target, section["layer_ids"], embed, lm_head, **maps)
    drafter.to(tensors["fc.weight"].dtype)
    state = {("midlayer." + k.removeprefix(layer_prefix) if k.startswith(layer_prefix) else k): v
             for k, v in tensors.items()}
    state.update(maps)
    drafter.load_state_dict(state, strict=True)
    return drafter


def load_eagle3(export_dir: str | os.PathLike):
    """Rebuild the ``Eagle3Drafter`` stored in an ``eagle3`` directory (strict: every tensor, none extra)."""
    path = Path(export_dir)
    config, tensors = _read(path)
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"{path}: eagle3 config lacks required key(s) {', '.join(missing)}")
    if ARCHITECTURE not in (config.get("architectures") or []):
        raise ValueError(f"{path}: architectures {config.get('architectures')} is not [{ARCHITECTURE!r}]")
    return _build(config, config["dspark"], tensors, "midlayer.", str(path))


def load_speculators_eagle3(export_dir: str | os.PathLike):
    """Rebuild the ``Eagle3Drafter`` stored in a speculators eagle3 directory."""
    path = Path(export_dir)
    config, tensors = _read(path)
    missing = [k for k in REQUIRED_SPECULATORS_KEYS if k not in config]
    if missing or config["speculators_model_type"] != "eagle3":
        raise ValueError(f"{path}: not a speculators eagle3 config (missing {', '.join(missing) or 'nothing'}, "
                         f"speculators_model_type {config.get('speculators_model_type')!r})")
    section = config["dspark"]
    if [i - 1 for i in config["eagle_aux_hidden_state_layer_ids"]] != section["layer_ids"]:
        raise ValueError(f"{path}: eagle_aux_hidden_state_layer_ids {config['eagle_aux_hidden_state_layer_ids']} "
                         f"(vLLM indexing) disagree with dspark layer_ids {section['layer_ids']} (+1 expected)")
    layer = {**config["transformer_layer_config"], "draft_vocab_size": config["draft_vocab_size"]}
    return _build(layer, section, tensors, "layers.0.", str(path))
