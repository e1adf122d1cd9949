"""The pipeline's stage modules: the embedding, one HF decoder layer (the family's own class), the final norm. Each
is built on the meta device and filled with only its own tensors from the safetensors index.

Legend: B batch, T tokens, H hidden size, C mHC streams, X one token's state between layers (``[H]`` or ``[C, H]``).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from dspark.targets.weights import expert_parts

TAG_HIDDEN, TAG_FEATURES, TAG_FINAL = 1, 2, 3  # p2p message kinds (tags keep them apart on one rank pair)

# Families whose layers differ by ``config.layer_types`` (Gemma4: sliding and full attention, each with its own
# mask and rotary table, the embedding scaled by sqrt(H)).
LAYER_TYPED = ("gemma4_text", "gemma4_unified_text")


class FamilyClasses(NamedTuple):
    """The classes of the family's own modules a stage builds, read off the model built on the meta device."""

    decoder: type
    rotary: type
    norm: type
    stream_head: type | None  # the head collapsing DeepSeek-V4's mHC streams before the final norm; None without


def family_classes(model: nn.Module) -> FamilyClasses:
    """``FamilyClasses`` of a (meta-device) ``*ForCausalLM`` (a multimodal Gemma4's text decoder)."""
    decoder = getattr(model.model, "language_model", model.model)
    head = getattr(decoder, "hc_head", None)
    return FamilyClasses(type(decoder.layers[0]), type(decoder.rotary_emb), type(decoder.norm),
                         None if head is None else type(head))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build modules in ``dtype`` like HF's from_pretrained (parameters with an explicit dtype keep it)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _read(weights, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Tensor ``name`` of the model (shape ``shape``) from the index: a fused expert tensor stored per expert is its
    pieces in memory order (``expert_parts``); None if absent."""
    pieces = expert_parts(weights, name, shape)
    if pieces is not None:
        return torch.cat([weights.load(piece).reshape(-1) for piece in pieces]).view(shape)
    return weights.load(name) if name in weights else None


def _recompute_rotary(module: nn.Module, config, rotary_cls: type) -> set[str]:
    """Refill the rotary tables of the family's rotary modules inside ``module`` (after ``to_empty``); returns the
    names of the buffers refilled. They are non-persistent (computed from the config, absent from checkpoints):
    DeepSeek-V4's compressors and indexers each own one."""
    refilled = set()
    for owner, sub in module.named_modules():
        if isinstance(sub, rotary_cls):
            fresh = rotary_cls(config=config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(sub, name, buf)
                refilled.add(f"{owner}.{name}" if owner else name)
    return refilled


def _load_module(module: nn.Module, prefix: str, weights, where: str, config=None, rotary_cls=None) -> nn.Module:
    """Materialise a module built on the meta device with the tensors ``prefix + name`` from ``weights``
    (and, given the ``config``, its inner rotary tables recomputed)."""
    module.to_empty(device="cpu")
    state = module.state_dict(keep_vars=True)
    refilled = _recompute_rotary(module, config, rotary_cls) if config is not None else set()
    transient = {n for n, _ in module.named_buffers()} - set(state) - refilled
    if transient:  # would stay uninitialised: none of the supported layers has any
        raise ValueError(f"{type(module).__name__} has non-persistent buffers {sorted(transient)}; cannot load")
    for name, tensor in state.items():
        full = prefix + name
        value = _read(weights, full, tuple(tensor.shape))
        if value is None:
            raise ValueError(f"tensor {full} is missing from the checkpoint {where}")
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"tensor {full} has shape {tuple(value.shape)} in {where}, "
                             f"the model config builds {tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(value.to(tensor.dtype))
        tensor.requires_grad_(False)
    return module


class TargetEmbedding(nn.Module):
    """Stage 0: token embedding (copied into the ``hc_mult`` streams of an mHC family, as its model forward does)."""

    def __init__(self, config, classes: FamilyClasses, weights, dtype: torch.dtype, prefix: str = "model."):
        super().__init__()
        self.num_streams = config.hc_mult if classes.stream_head is not None else 0
        # Gemma4 scales the embedding by sqrt(H), the scale cast to the weight dtype first (as its model does).
        self.scale = config.hidden_size ** 0.5 if config.model_type in LAYER_TYPED else None
        with _default_dtype(dtype), torch.device("meta"):
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        _load_module(self.embed_tokens, prefix + "embed_tokens.", weights, str(weights.model_dir))

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        embed_BTH = self.embed_tokens(input_ids_BT)
        if self.scale is not None:
            embed_BTH = embed_BTH * torch.tensor(self.scale).to(embed_BTH.dtype)
        if not self.num_streams:
            return embed_BTH
        return embed_BTH.unsqueeze(2).expand(-1, -1, self.num_streams, -1).contiguous()  # [B, T, C, H]


class TargetDecoderLayer(nn.Module):
    """One HF decoder layer (the family's own class), holding only its own tensors."""

    def __init__(self, config, classes: FamilyClasses, layer_id: int, weights, dtype: torch.dtype,
                 prefix: str = "model."):
        super().__init__()
        self.layer_id = layer_id
        self.layer_type = config.layer_types[layer_id] if config.model_type in LAYER_TYPED else None
        with _default_dtype(dtype), torch.device("meta"):
            self.layer = classes.decoder(config, layer_id)
        with _default_dtype(dtype):  # inner rotary tables built as the model's own would be
            _load_module(self.layer, f"{prefix}layers.{layer_id}.", weights, str(weights.model_dir), config,
                         classes.rotary)

    def forward(self, hidden_BTX: torch.Tensor, layer_inputs: dict) -> torch.Tensor:
        # ``layer_inputs``: what the family's model forward passes every layer (``PipelineTarget._layer_inputs``);
        # its ``cache`` is a transformers Cache indexed by global layer id (the layer's own ``layer_idx``). Families
        # with layer types get a mask and a rotary table per type: this layer takes its own.
        if self.layer_type is not None:
            layer_inputs = {**layer_inputs, "attention_mask": layer_inputs["attention_mask"][self.layer_type],
                            "position_embeddings": layer_inputs["position_embeddings"][self.layer_type]}
        out = self.layer(hidden_BTX, **layer_inputs)
        return out[0] if isinstance(out, tuple) else out


class TargetFinalNorm(nn.Module):
    """Last stage: the final RMSNorm (its output is the final hidden state, pre-LM-head), after the head that
    collapses the streams of an mHC family (``[B, T, C, H] -> [B, T, H]``)."""

    def __init__(self, config, classes: FamilyClasses, weights, dtype: torch.dtype, prefix: str = "model."):
        super().__init__()
        self.hc_head = None
        if classes.stream_head is not None:  # V4's model keeps its final norm and stream head in fp32
            dtype = torch.float32
        with _default_dtype(dtype), torch.device("meta"):
            self.norm = classes.norm(config.hidden_size, eps=config.rms_norm_eps)
            if classes.stream_head is not None:
                self.hc_head = classes.stream_head(config)
        _load_module(self.norm, prefix + "norm.", weights, str(weights.model_dir))
        if self.hc_head is not None:
            _load_module(self.hc_head, "model.hc_head.", weights, str(weights.model_dir))

    def forward(self, hidden_BTX: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_BTX if self.hc_head is None else self.hc_head(hidden_BTX))
