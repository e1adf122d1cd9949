"""What every target backend shares: the dtype names, the layer-id check and capture, the target identity, and the
checkpoint-against-model check.

Legend: B batch, T tokens, L feature layers, C mHC streams, H hidden size.

Layer id i is the output of decoder layer i before the final norm, for every i in ``-1..num_layers - 1`` (-1 = the
embedding output). transformers' ``hidden_states[i + 1]`` is that output for every layer but the last: its
``hidden_states[-1]`` is the model's final (post-norm) hidden state. ``raw_last_hidden_state`` makes it the last
decoder layer's own output for the duration of a forward, so the last layer (DeepSeek-V4's drafter reads 40-42 of
43) is captured like the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import torch
from torch import nn

from dspark.targets.base import TargetIdentity, config_hash, text_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """``target.dtype`` as a torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"target.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_layer_ids(layer_ids: list[int], num_layers: int, name: str) -> None:
    """Refuse feature-layer ids outside ``-1..num_layers - 1`` (before any weight is read)."""
    bad = [i for i in layer_ids if not -1 <= i < num_layers]
    if bad:
        raise ValueError(f"target.layer_ids {bad} out of range for {name}: it has {num_layers} decoder layers, "
                         f"valid ids are -1..{num_layers - 1} (-1 = embeddings, {num_layers - 1} = the last layer "
                         f"before the final norm)")


def collapse_streams(features: torch.Tensor, ndim: int) -> torch.Tensor:
    """Target features as every backend returns them: ``[..., L, H]`` with ``ndim`` dims.

    Targets with several residual streams per token (DeepSeek-V4's mHC) compute ``[..., L, C, H]``; their mean over
    the ``C`` streams stands for the layer (as DeepSeek's own drafter reads its target layers), so drafter widths,
    exported layouts and cache sizes are those of any target of that hidden size and do not grow with ``C``.
    """
    if features.dim() == ndim + 1:
        return features.mean(dim=-2)
    return features


def select_layers(hidden_states: tuple[torch.Tensor, ...], layer_ids: list[int]) -> torch.Tensor:
    """``[B, T, L, H]`` of a transformers forward's ``hidden_states`` (run under ``raw_last_hidden_state``):
    ``hidden_states[0]`` is the embedding output, ``hidden_states[i + 1]`` the output of layer i."""
    return collapse_streams(torch.stack([hidden_states[i + 1] for i in layer_ids], dim=2), 4)


@contextlib.contextmanager
def raw_last_hidden_state(model: nn.Module):
    """Within: ``hidden_states[-1]`` of ``model``'s forwards is the last decoder layer's output, not the final
    (post-norm) hidden state transformers puts there by default (``capture_outputs`` reads the decoder config's
    ``tie_last_hidden_states``). Set for the call only, so the config (its hash, what drafters copy) is unchanged."""
    config = text_config(model.config)
    config.tie_last_hidden_states = False
    try:
        yield
    finally:
        del config.tie_last_hidden_states


def target_identity(config, tokenizer, layer_ids: list[int], name: str) -> TargetIdentity:
    """The identity of a target from its decoder config and tokenizer alone: every backend gives the same one for
    the same checkpoint (a cache built with one is accepted by the others)."""
    if tokenizer is None:
        raise ValueError(f"target {name} has no tokenizer files; its identity needs one")
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return TargetIdentity(
        name=name, config_hash=config_hash(config.to_dict()), layer_ids=list(layer_ids),
        hidden_size=config.hidden_size, vocab_size=config.vocab_size, num_layers=config.num_hidden_layers,
        tokenizer_hash=hashlib.sha256(vocab).hexdigest()[:16], chat_template=getattr(tokenizer, "chat_template", None),
    )


def expected_tensors(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Names and shapes a checkpoint of ``model`` must hold: parameters (tied ones once) and persistent buffers.

    Also returns the tied aliases (e.g. ``lm_head.weight`` tied to the embedding): a checkpoint may carry them
    or not, and they are never read. Works on a meta-device model.
    """
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # duplicates (ties) removed
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(expected)
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                expected[f"{module_name}.{name}" if module_name else name] = tuple(buf.shape)
    return expected, aliases


def check_checkpoint(model: nn.Module, index) -> dict[str, tuple[int, ...]]:
    """Refuse a checkpoint (``WeightIndex``) whose names or shapes differ from ``model`` (a meta-device
    ``*ForCausalLM``), from the headers only; returns the model's expected tensors (name -> shape).

    Experts stored per expert (DeepSeek's hub layout) are matched against the model's fused ones, a tied alias may
    be stored or not, and multi-token-prediction layers are skipped (``WeightIndex.check_against``)."""
    from dspark.targets.weights import checkpoint_layout

    expected, aliases = expected_tensors(model)
    present_aliases = {a: index.shape(a) for a in aliases if a in index}
    index.check_against({**checkpoint_layout(expected, index), **present_aliases})
    return expected
