"""vLLM speculators' layout (DESIGN section 8) for DSpark / DFlash drafters, and its loader.

``config.json`` top level: ``speculators_model_type`` (dspark | dflash), ``architectures`` (``DSparkSpeculator``
| ``DFlashSpeculator``), ``speculators_version``, ``speculators_config`` {algorithm, proposal_methods,
default_proposal_method, verifier {name_or_path, architectures}}, ``transformer_layer_config`` (the Qwen3 config
of the draft decoder; ``num_hidden_layers`` = draft layers), ``draft_vocab_size``, ``tie_word_embeddings: false``,
``aux_hidden_state_layer_ids``, ``block_size``, ``mask_token_id``, ``sample_from_anchor`` and, for dspark,
``markov_rank``, ``markov_head_type``, ``enable_confidence_head``, ``confidence_head_with_markov``; plus a
versioned ``dspark`` section (training-only fields and layer-id semantics) that this project's loader reads.

Conventions that differ from the deepspec layout:
- ``aux_hidden_state_layer_ids`` are in vLLM's indexing, where id j is the hidden state entering decoder layer j
  (0 = the embeddings): our id i (output of layer i, -1 = embeddings) is written as i + 1.
- ``sample_from_anchor``: true in the DSpark layout (the anchor slot predicts; speculative tokens = block_size),
  false in the DFlash layout (the anchor is the bonus token; block_size = K + 1, speculative tokens = K).
- Tensors are named as in the deepspec layout but ``embed_tokens`` is never written, and ``lm_head`` only when
  the draft vocabulary is pruned (never for these drafters): the loader takes both from the verifier.
Eagle3 drafters are written by ``dspark.export.eagle3.export_speculators_eagle3`` (same format family).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dspark.export.common import WEIGHTS_FILE, check_tensors, write_checkpoint
from dspark.export.verifier import verifier_fields

SPECULATORS_VERSION = "0.9.0"
ARCHITECTURES = {"dspark": "DSparkSpeculator", "dflash": "DFlashSpeculator"}
# Version of the "dspark" section; readers refuse newer ones.
SECTION_VERSION = 1
REQUIRED_KEYS = ("speculators_model_type", "architectures", "speculators_version", "speculators_config",
                 "transformer_layer_config", "draft_vocab_size", "tie_word_embeddings", "aux_hidden_state_layer_ids",
                 "block_size", "mask_token_id", "sample_from_anchor")
REQUIRED_DSPARK_KEYS = ("markov_rank", "enable_confidence_head")
REQUIRED_SPECULATORS_CONFIG_KEYS = ("algorithm", "proposal_methods", "default_proposal_method", "verifier")
REQUIRED_LAYER_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "num_hidden_layers")
# deepspec config fields that describe the drafter rather than the draft decoder layers: they go to the top level
# (under their speculators names) or to the "dspark" section, never into transformer_layer_config.
_NOT_LAYER_FIELDS = ("architectures", "block_size", "mask_token_id", "target_layer_ids", "num_anchors",
                     "num_target_layers", "enable_confidence_head", "confidence_head_with_markov", "markov_rank",
                     "markov_head_type", "dspark")
_FROZEN = ("embed_tokens.weight", "lm_head.weight")


def speculators_config(drafter, target_config, where: str = "speculators export") -> dict:
    """The ``config.json`` of ``drafter`` (a DSpark/DFlash drafter) in vLLM speculators' layout."""
    from dspark.export.deepspec import deepspec_config

    deepspec = deepspec_config(drafter)
    algorithm = drafter.algorithm
    speculative_tokens = drafter.block_size  # K predicted tokens in both block layouts
    layer = {k: v for k, v in deepspec.items() if k not in _NOT_LAYER_FIELDS}
    verifier = verifier_fields(target_config, where)
    config = {
        "architectures": [ARCHITECTURES[algorithm]],
        "speculators_model_type": algorithm,
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": algorithm,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": verifier,
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": drafter.vocab_size,
        "target_hidden_size": drafter.hidden_size,
        "tie_word_embeddings": False,
        "aux_hidden_state_layer_ids": [i + 1 for i in drafter.layer_ids],
        "block_size": deepspec["block_size"],
        "mask_token_id": deepspec["mask_token_id"],
        "sample_from_anchor": not drafter.dflash_layout,
        "dtype": deepspec["dtype"],
    }
    if algorithm == "dspark":
        config["markov_rank"] = deepspec["markov_rank"]
        if deepspec["markov_rank"] > 0:
            config["markov_head_type"] = deepspec["markov_head_type"]
        config["enable_confidence_head"] = deepspec["enable_confidence_head"]
        if deepspec["enable_confidence_head"]:
            config["confidence_head_with_markov"] = deepspec["confidence_head_with_markov"]
    section = deepspec["dspark"]
    config["dspark"] = {**section, "format_version": SECTION_VERSION, "num_anchors": deepspec["num_anchors"],
                        "target_layer_ids": deepspec["target_layer_ids"],
                        "num_target_layers": deepspec["num_target_layers"]}
    return config


def _deepspec_view(config: dict, num_target_layers: int) -> dict:
    """The deepspec ``config.json`` equivalent of a speculators config (for shapes and the drafter config)."""
    layer = config["transformer_layer_config"]
    dspark = config["speculators_model_type"] == "dspark"
    markov_rank = config.get("markov_rank", 0) if dspark else 0
    view = {**layer, "block_size": config["block_size"], "mask_token_id": config["mask_token_id"],
            "target_layer_ids": [i - 1 for i in config["aux_hidden_state_layer_ids"]],
            "num_target_layers": num_target_layers, "markov_rank": markov_rank,
            "enable_confidence_head": bool(config.get("enable_confidence_head", False)) and dspark}
    if markov_rank > 0:
        view["markov_head_type"] = config.get("markov_head_type", "vanilla")
    if view["enable_confidence_head"]:
        view["confidence_head_with_markov"] = config.get("confidence_head_with_markov", markov_rank > 0)
    return view


def _expected_shapes(view: dict) -> dict[str, tuple[int, ...]]:
    from dspark.export.deepspec import expected_tensor_shapes

    return {k: v for k, v in expected_tensor_shapes(view).items() if k not in _FROZEN}


def _check_config(config: dict, where: str) -> None:
    """Required keys of the speculators layout (all algorithms of the DFlash family)."""
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if config.get("speculators_model_type") == "dspark":
        missing += [k for k in REQUIRED_DSPARK_KEYS if k not in config]
        if config.get("markov_rank", 0) > 0 and "markov_head_type" not in config:
            missing.append("markov_head_type")
    spec = config.get("speculators_config")
    if isinstance(spec, dict):
        missing += [f"speculators_config.{k}" for k in REQUIRED_SPECULATORS_CONFIG_KEYS if k not in spec]
        verifier = spec.get("verifier")
        if isinstance(verifier, dict):
            missing += [f"speculators_config.verifier.{k}" for k in ("name_or_path", "architectures")
                        if k not in verifier]
    layer = config.get("transformer_layer_config")
    if isinstance(layer, dict):
        missing += [f"transformer_layer_config.{k}" for k in REQUIRED_LAYER_KEYS if k not in layer]
    if missing:
        raise ValueError(f"{where}: speculators config lacks required key(s) {', '.join(missing)}")
    kind = config["speculators_model_type"]
    if kind not in ARCHITECTURES:
        raise ValueError(f"{where}: speculators_model_type {kind!r} is not a DFlash-family drafter; expected one of "
                         f"{', '.join(ARCHITECTURES)} (eagle3 has its own loader)")
    if ARCHITECTURES[kind] not in (config.get("architectures") or []):
        raise ValueError(f"{where}: architectures {config.get('architectures')} do not name {ARCHITECTURES[kind]!r}")
    if config["speculators_config"]["algorithm"] != kind:
        raise ValueError(f"{where}: speculators_config.algorithm {config['speculators_config']['algorithm']!r} != "
                         f"speculators_model_type {kind!r}")


def _check_expressible(drafter, target_config, where: str) -> None:
    """Refuse drafters this layout cannot hold (the loader could not rebuild them from the file + verifier)."""
    from dspark.drafters.common import config_get
    from dspark.drafters.dspark.model import DSparkDrafter

    algorithm = getattr(drafter, "algorithm", type(drafter).__name__)
    if not isinstance(drafter, DSparkDrafter) or algorithm not in ARCHITECTURES:
        raise ValueError(f"{where}: the speculators layout holds dspark, dflash and eagle3 drafters, got "
                         f"{algorithm!r}")
    if target_config is not None:
        for key, mine in (("hidden_size", drafter.hidden_size), ("vocab_size", drafter.vocab_size)):
            if config_get(target_config, key) != mine:
                raise ValueError(f"{where}: drafter {key} {mine} does not match the verifier's "
                                 f"{config_get(target_config, key)}: the loader takes embed_tokens and lm_head from "
                                 f"the verifier")
        layers = config_get(target_config, "num_hidden_layers")
        if layers is not None and layers != drafter.num_target_layers:
            raise ValueError(f"{where}: drafter was built for a {drafter.num_target_layers}-layer target, the "
                             f"verifier has {layers}")


def export_speculators(drafter, target_config, out_dir: str | os.PathLike) -> Path:
    """Write ``drafter`` in vLLM speculators' layout into ``out_dir``; returns the directory.

    ``target_config`` (the verifier's HF config, object or dict) names the verifier and is cross-checked; it must
    carry an engine-loadable ``_name_or_path`` and ``architectures`` (``dspark.export.verifier.verifier_config``
    makes one from a dspark target name). Eagle3 drafters go to ``dspark.export.eagle3.export_speculators_eagle3``.
    """
    out = Path(out_dir)
    if getattr(drafter, "algorithm", None) == "eagle3":
        try:
            from dspark.export.eagle3 import export_speculators_eagle3
        except ImportError as exc:
            raise ValueError(f"{out}: eagle3 drafters are written by dspark.export.eagle3."
                             f"export_speculators_eagle3, which this install lacks ({exc})") from None
        return export_speculators_eagle3(drafter, target_config, out)
    _check_expressible(drafter, target_config, str(out))
    config = speculators_config(drafter, target_config, str(out))
    _check_config(config, str(out))
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in drafter.full_state_dict().items()
               if k not in _FROZEN}
    expected = _expected_shapes(_deepspec_view(config, drafter.num_target_layers))
    _check_tensors(tensors, expected, str(out))
    return write_checkpoint(out, tensors, config)


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    check_tensors(tensors, expected, "speculators", where)


def _load_verifier(name_or_path: str, layer_ids: list[int]):
    """(HF config, embedding, LM head) of the verifier named in the config (a dspark target name or HF dir)."""
    from dspark.config import TargetConfig
    from dspark.targets import load_target

    target = load_target(TargetConfig(name_or_path=name_or_path, layer_ids=layer_ids))
    return target.config, target.embed_weight.detach().clone(), target.lm_head_weight.detach().clone()


def load_speculators(export_dir: str | os.PathLike, verifier=None):
    """Rebuild the drafter in a speculators directory, with ``embed_tokens`` and ``lm_head`` from the verifier.

    ``verifier``: a target backend (anything with ``config``, ``embed_weight`` and ``lm_head_weight``), a
    ``(config, embed_VH, lm_head_VH)`` tuple, a name/path for ``dspark.targets.load_target``, or None for the
    config's ``speculators_config.verifier.name_or_path``. Frozen tensors present in the file are overwritten by
    the verifier's, as speculators' own loader does.
    """
    from safetensors.torch import load_file

    path = Path(export_dir)
    config_path, weights_path = path / "config.json", path / WEIGHTS_FILE
    for f in (config_path, weights_path):
        if not f.is_file():
            raise ValueError(f"{path} is not a speculators export: {f.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if config.get("speculators_model_type") == "eagle3":
        from dspark.export.eagle3 import load_speculators_eagle3

        return load_speculators_eagle3(path)
    _check_config(config, str(path))
    section = config.get("dspark") or {}
    version = section.get("format_version", SECTION_VERSION)
    if version > SECTION_VERSION:
        raise ValueError(f"{path}: 'dspark' section format_version {version}; this dspark reads versions up to "
                         f"{SECTION_VERSION} (upgrade dspark)")
    layer_ids = [i - 1 for i in config["aux_hidden_state_layer_ids"]]
    target_config, embed_VH, lm_head_VH = _resolve_verifier(verifier, config, layer_ids, str(path))
    from dspark.drafters.common import config_get

    layer = config["transformer_layer_config"]
    for key in ("hidden_size", "vocab_size"):
        if config_get(target_config, key) != layer[key]:
            raise ValueError(f"{path}: transformer_layer_config.{key} {layer[key]} does not match the verifier's "
                             f"{config_get(target_config, key)}")
    if config["draft_vocab_size"] != layer["vocab_size"]:
        raise ValueError(f"{path}: draft_vocab_size {config['draft_vocab_size']} != vocab_size {layer['vocab_size']}: "
                         f"pruned draft vocabularies exist only for eagle3 drafters here")
    num_target_layers = config_get(target_config, "num_hidden_layers")
    view = _deepspec_view(config, num_target_layers)
    tensors = {k: v for k, v in load_file(str(weights_path)).items() if k not in _FROZEN}
    _check_tensors(tensors, _expected_shapes(view), str(path))
    drafter_cfg = _drafter_config(config, view, section)
    from dspark.drafters import build_drafter

    drafter = build_drafter(drafter_cfg, {**layer, "num_target_layers": num_target_layers}, layer_ids,
                            embed_VH, lm_head_VH)
    drafter.to(tensors["fc.weight"].dtype)
    drafter.load_state_dict(tensors, strict=True)
    return drafter


def _resolve_verifier(verifier, config: dict, layer_ids: list[int], where: str):
    if verifier is None:
        verifier = config["speculators_config"]["verifier"]["name_or_path"]
        if not verifier:
            raise ValueError(f"{where}: speculators_config.verifier.name_or_path is null: pass the verifier (target) "
                             f"to load_speculators")
    if isinstance(verifier, (str, os.PathLike)):
        return _load_verifier(str(verifier), layer_ids)
    if isinstance(verifier, tuple):
        return verifier
    return verifier.config, verifier.embed_weight.detach(), verifier.lm_head_weight.detach()


def _drafter_config(config: dict, view: dict, section: dict):
    """The ``DrafterConfig`` a speculators config describes (training-only fields from the dspark section)."""
    from dspark.config import DrafterConfig
    from dspark.export.deepspec import block_drafter_config

    dflash_layout = not config["sample_from_anchor"]
    return block_drafter_config(
        config["speculators_model_type"], section, num_layers=config["transformer_layer_config"]["num_hidden_layers"],
        block_size=config["block_size"] - int(dflash_layout), mask_token_id=config["mask_token_id"],
        dflash_layout=dflash_layout, num_anchors=section.get("num_anchors", DrafterConfig().num_anchors),
        intermediate_size=config["transformer_layer_config"]["intermediate_size"], markov_rank=view["markov_rank"],
        markov_head_type=view.get("markov_head_type", "vanilla"), enable_confidence_head=view["enable_confidence_head"])
