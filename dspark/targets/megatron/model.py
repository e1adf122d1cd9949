"""Llama-style decoder (``llama``, ``qwen3``) written against a small layer factory, so the same code runs on
Megatron-core tensor-parallel layers (``parallel.py``) or plain ``nn.Linear``.

Every projection is built through ``layers``: ``column`` layers shard their output features over the
tensor-parallel group, ``row`` layers shard their input features and all-reduce the result, and the
embedding / LM head shard the vocabulary. This module only sees its local heads and columns: a rank holds
``num_heads / tp`` query heads, ``num_kv_heads / tp`` KV heads and ``intermediate / tp`` MLP columns.
Numerics follow transformers' modeling_llama / modeling_qwen3 (fp32 RMSNorm, rotate-half RoPE with the HF
``rope_parameters`` inverse frequencies, softmax in fp32).

Legend: B batch, T new tokens, S key slots (cached + new), H hidden, N local query heads, K local KV heads,
D head dim, I local intermediate, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

# The drafters' RMSNorm: fp32 normalisation, cast back, then scale (HF's op order).
from dspark.drafters.common import RMSNorm

if TYPE_CHECKING:
    from dspark.targets.megatron.deepseek import MLASpec, MoESpec

# Families whose HF config maps onto this module tree; qk_norm = per-head RMSNorm on q and k (Qwen3).
# deepseek_v3 swaps in MLA and MoE blocks from ``deepseek.py``.
FAMILIES = {"llama": {"qk_norm": False}, "qwen3": {"qk_norm": True}, "deepseek_v3": {"qk_norm": False}}
# RoPE variants whose inverse frequencies depend on the sequence length at run time; not reproduced here.
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class DecoderSpec:
    """The architecture fields of an HF llama/qwen3 config that this module tree needs."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    mla: MLASpec | None = None  # deepseek_v3 only
    moe: MoESpec | None = None

    @classmethod
    def from_hf_config(cls, cfg) -> DecoderSpec:
        family = cfg.model_type
        if family not in FAMILIES:
            raise ValueError(f"the megatron backend builds families {', '.join(FAMILIES)}; "
                             f"got model_type {family!r}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"{family}: hidden_act {cfg.hidden_act!r} is not supported (expected silu)")
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"{family}: sliding-window layers ({sorted(set(layer_types))}) are not supported by "
                             f"the megatron backend; use target.backend=hf")
        rope = _rope_parameters(cfg)
        if any(k in rope.get("rope_type", "default") for k in _DYNAMIC_ROPE):
            raise ValueError(f"{family}: rope_type {rope['rope_type']!r} changes with sequence length and is not "
                             f"supported by the megatron backend; use target.backend=hf")
        mla = moe = None
        if family == "deepseek_v3":
            from dspark.targets.megatron.deepseek import deepseek_specs

            mla, moe = deepseek_specs(cfg)
        return cls(
            family=family, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            vocab_size=cfg.vocab_size, rms_norm_eps=cfg.rms_norm_eps,
            attention_bias=bool(getattr(cfg, "attention_bias", False)),
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)), qk_norm=FAMILIES[family]["qk_norm"],
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), mla=mla, moe=moe,
        )


def _rope_parameters(cfg) -> dict:
    # transformers 5 standardises rope_theta / rope_scaling into cfg.rope_parameters.
    params = getattr(cfg, "rope_parameters", None)
    if params is None:
        params = dict(getattr(cfg, "rope_scaling", None) or {}, rope_theta=getattr(cfg, "rope_theta", 10000.0))
    return dict(params)


def rope_inverse_frequencies(cfg) -> tuple[torch.Tensor, float]:
    """``(inv_freq [D/2], attention_scaling)`` exactly as the HF rotary embedding computes them.

    Scaled variants (linear, llama3, yarn, ...) come from transformers' own ``ROPE_INIT_FUNCTIONS`` so the
    frequencies are bit-identical to the reference; the default form is the plain ``1 / theta^(2i/D)``.
    """
    rope = _rope_parameters(cfg)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu")
                                                  .to(torch.float) / dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    return inv_freq, float(scaling)


class LayerFactory(Protocol):
    """What the model needs from a parallelism: sharded projections and a (possibly) sharded vocabulary."""

    tp_size: int
    tp_rank: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the tensor-parallel group (expert outputs computed on different ranks)."""

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module: ...

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module: ...

    def embedding(self, vocab_size: int, hidden_size: int) -> nn.Module: ...


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Per-layer keys/values ``[B, K, S, D]`` of this rank's KV heads; ``crop`` rolls back speculative tokens."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k_BKTD = torch.cat([self.keys[layer], k_BKTD], dim=2)
            v_BKTD = torch.cat([self.values[layer], v_BKTD], dim=2)
        self.keys[layer], self.values[layer] = k_BKTD, v_BKTD
        return k_BKTD, v_BKTD

    def crop(self, length: int) -> None:
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :length], v[:, :, :length]


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, layers: LayerFactory, layer_idx: int):
        super().__init__()
        tp = layers.tp_size
        self.layer_idx = layer_idx
        self.head_dim = spec.head_dim
        self.num_local_heads = spec.num_heads // tp
        self.num_local_kv_heads = spec.num_kv_heads // tp
        q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.q_proj = layers.column(spec.hidden_size, q_out, spec.attention_bias)
        self.k_proj = layers.column(spec.hidden_size, kv_out, spec.attention_bias)
        self.v_proj = layers.column(spec.hidden_size, kv_out, spec.attention_bias)
        self.o_proj = layers.row(q_out, spec.hidden_size, spec.attention_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x_BTH: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor, bias_B1TS: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x_BTH.shape
        q_BTND = self.q_proj(x_BTH).view(B, T, self.num_local_heads, self.head_dim)
        k_BTKD = self.k_proj(x_BTH).view(B, T, self.num_local_kv_heads, self.head_dim)
        v_BKTD = self.v_proj(x_BTH).view(B, T, self.num_local_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q_BTND, k_BTKD = self.q_norm(q_BTND), self.k_norm(k_BTKD)
        q_BNTD, k_BKTD = q_BTND.transpose(1, 2), k_BTKD.transpose(1, 2)
        cos, sin = cos_BTD.unsqueeze(1), sin_BTD.unsqueeze(1)
        q_BNTD = q_BNTD * cos + rotate_half(q_BNTD) * sin
        k_BKTD = k_BKTD * cos + rotate_half(k_BKTD) * sin
        if cache is not None:
            k_BKTD, v_BKTD = cache.append(self.layer_idx, k_BKTD, v_BKTD)
        # Local query head i reads local KV head i // group: the contiguous head split keeps HF's GQA grouping.
        group = self.num_local_heads // self.num_local_kv_heads
        k_BNSD = k_BKTD.repeat_interleave(group, dim=1)
        v_BNSD = v_BKTD.repeat_interleave(group, dim=1)
        scores_BNTS = torch.matmul(q_BNTD, k_BNSD.transpose(2, 3)) * self.head_dim**-0.5 + bias_B1TS
        probs_BNTS = F.softmax(scores_BNTS, dim=-1, dtype=torch.float32).to(q_BNTD.dtype)
        out_BTND = torch.matmul(probs_BNTS, v_BNSD).transpose(1, 2)
        return self.o_proj(out_BTND.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec, layers: LayerFactory, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or spec.intermediate_size
        self.gate_proj = layers.column(spec.hidden_size, inter, spec.mlp_bias)
        self.up_proj = layers.column(spec.hidden_size, inter, spec.mlp_bias)
        self.down_proj = layers.row(inter, spec.hidden_size, spec.mlp_bias)

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BTH)) * self.up_proj(x_BTH))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, layers: LayerFactory, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if spec.mla is None:
            self.self_attn = Attention(spec, layers, layer_idx)
        else:
            from dspark.targets.megatron.deepseek import LatentAttention

            self.self_attn = LatentAttention(spec, layers, layer_idx)
        if spec.moe is None or layer_idx < spec.moe.first_k_dense:
            self.mlp = MLP(spec, layers)
        else:
            from dspark.targets.megatron.deepseek import MoE

            self.mlp = MoE(spec, layers, layers.all_reduce)

    def forward(self, x_BTH, cos_BTD, sin_BTD, bias_B1TS, cache):
        x_BTH = x_BTH + self.self_attn(self.input_layernorm(x_BTH), cos_BTD, sin_BTD, bias_B1TS, cache)
        return x_BTH + self.mlp(self.post_attention_layernorm(x_BTH))


class Decoder(nn.Module):
    """Embedding, decoder layers, final norm and a vocab-sharded LM head (``lm_head`` returns local logits).

    Parameter names follow HF's minus the ``model.`` prefix, so the weight adapter is a name-and-slice map.
    """

    def __init__(self, spec: DecoderSpec, layers: LayerFactory, inv_freq: torch.Tensor, rope_scaling: float):
        super().__init__()
        self.spec = spec
        self.embed_tokens = layers.embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, layers, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = layers.column(spec.hidden_size, self.embed_tokens.num_embeddings, False)
        self.tie_weights()
        # A plain attribute, not a buffer: the model is built on the meta device and materialised with
        # to_empty(), which would leave a buffer uninitialised.
        self.inv_freq = inv_freq.to("cpu")
        self.rope_scaling = rope_scaling

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config ties them (again after ``to_empty``, which
        gives every parameter its own new storage)."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def cast(self, dtype: torch.dtype) -> Decoder:
        """All parameters to ``dtype`` except MoE routers, which HF keeps in fp32 (``_keep_in_fp32_modules``)."""
        self.to(dtype)
        for module in self.modules():
            if getattr(module, "keep_fp32", False):
                module.float()
        return self

    def rotary(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BTd = positions_BT[..., None].float() * self.inv_freq.to(positions_BT.device)
        emb_BTD = torch.cat((freqs_BTd, freqs_BTd), dim=-1)
        return (emb_BTD.cos() * self.rope_scaling).to(dtype), (emb_BTD.sin() * self.rope_scaling).to(dtype)

    def forward(self, ids_BT: torch.Tensor, positions_BT: torch.Tensor, key_mask_BS: torch.Tensor,
                layer_ids: list[int], cache: KVCache | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Run ``ids_BT`` after the ``cache`` prefix (slots ``0..S-T``).

        ``key_mask_BS`` marks real (non-pad) key slots over cached + new tokens; a query at slot s sees real
        keys at slots <= s. Returns (the outputs at ``layer_ids``, -1 = embeddings, and the final-normed hidden).
        """
        x_BTH = self.embed_tokens(ids_BT)
        B, T, _ = x_BTH.shape
        S = key_mask_BS.shape[1]
        q_slot_T = torch.arange(S - T, S, device=ids_BT.device)
        allowed_BTS = (torch.arange(S, device=ids_BT.device)[None, :] <= q_slot_T[:, None])[None] \
            & key_mask_BS[:, None, :].bool()
        # A large finite negative (as HF's eager path) keeps fully masked pad rows finite instead of NaN.
        bias_B1TS = torch.zeros(B, 1, T, S, dtype=x_BTH.dtype, device=x_BTH.device)
        bias_B1TS.masked_fill_(~allowed_BTS[:, None], torch.finfo(x_BTH.dtype).min)
        cos_BTD, sin_BTD = self.rotary(positions_BT, x_BTH.dtype)
        wanted = set(layer_ids)
        outputs = {-1: x_BTH} if -1 in wanted else {}
        for i, layer in enumerate(self.layers):
            x_BTH = layer(x_BTH, cos_BTD, sin_BTD, bias_B1TS, cache)
            if i in wanted:
                outputs[i] = x_BTH
        return [outputs[i] for i in layer_ids], self.norm(x_BTH)
