"""Building blocks shared by the parallel drafters: RMSNorm, RoPE, and a Qwen3 decoder layer with KV injection,
or its Gemma4 variant (``LayerVariant``: sandwich norms, scale-free v norm, K = V, GELU MLP, attention scale 1).

Legend: B batch, T context tokens, A anchors (blocks) per sequence, K block length, H hidden size,
N query heads, G key/value heads, Q query heads per key/value head (N = G * Q), D head dim, F MLP width.

KV injection (DFlash / DSpark): queries come from the block tokens only; keys and values are the layer's own
k/v projections of the fused target context followed by those of the block. A block attends to the context
positions strictly before its anchor and to all of its own tokens (bidirectionally), never to other blocks.
The attention is computed per sequence as block queries ``[A, K]`` against the shared context keys ``[T]``
(masked by ``context position < anchor position``) and against their own block keys ``[A, K, K]``; both score
sets share one softmax. The cost is ``A * K * (T + K)`` per head, never a dense ``[T x T]`` or
``[A*K x A*K]`` mask.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


def config_get(config, key: str, default=None):
    """Read ``key`` from an HF config object or a plain dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    try:
        return getattr(config, key, default)
    except Exception:  # noqa: BLE001 - transformers' per-layer configs (Gemma4) refuse per-layer attributes
        return vars(config).get(key, default)  # the global value, as the config file holds it


def rope_theta_from_config(config) -> float:
    """RoPE base from ``config.rope_parameters["rope_theta"]`` (transformers 5; DeepSeek-V4 nests its main
    attention's under ``"main"``), else ``config.rope_theta``."""
    params = config_get(config, "rope_parameters") or {}
    if isinstance(params, dict) and isinstance(params.get("main"), dict):  # DeepSeek-V4: {"main": ..., "compress": ...}
        params = params["main"]
    if isinstance(params, dict) and "rope_theta" in params:
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            warnings.warn(f"rope_type {rope_type!r} of the target is not implemented by the drafter: it uses plain "
                          f"RoPE with theta {params['rope_theta']} (fine for contexts within the original length)")
        return float(params["rope_theta"])
    theta = config_get(config, "rope_theta")
    if theta is None:
        raise ValueError("target config has neither rope_parameters['rope_theta'] nor rope_theta")
    return float(theta)


class LayerVariant(NamedTuple):
    """How the draft layers follow the target family. ``gemma4``: Gemma4's layer (DESIGN 8.2) with the global
    attention geometry; ``rotary_fraction`` is the share of head-dim frequency pairs that rotate (proportional
    RoPE), ``softcap`` the final-logit softcap (0 = none) of draft and target logits."""

    gemma4: bool = False
    k_eq_v: bool = False
    rotary_fraction: float = 1.0
    softcap: float = 0.0


GEMMA4_TEXT_TYPES = ("gemma4_text", "gemma4_unified_text")


def layer_variant(config) -> LayerVariant:
    """The layer variant of a target (HF) config or of an exported drafter config (dict)."""
    model_type = config_get(config, "model_type")
    if model_type not in GEMMA4_TEXT_TYPES:
        return LayerVariant()
    full = (config_get(config, "rope_parameters") or {}).get("full_attention") or {}
    return LayerVariant(gemma4=True, k_eq_v=bool(config_get(config, "attention_k_eq_v", False)),
                        rotary_fraction=float(full.get("partial_rotary_factor", 1.0)),
                        softcap=float(config_get(config, "final_logit_softcapping") or 0.0))


def gemma4_global_geometry(config) -> tuple[int, int]:
    """(head dim, kv heads) of Gemma4's global (full-attention) layers, which the draft layers use: top-level
    ``global_head_dim`` / ``num_global_key_value_heads`` (transformers 5.10 and exported configs), else the
    per-layer config newer transformers builds."""
    head_dim = config_get(config, "global_head_dim")
    kv_heads = config_get(config, "num_global_key_value_heads")
    per_layer = None if isinstance(config, dict) else getattr(config, "per_layer_config", None)
    if head_dim is None and per_layer is not None:
        layer = per_layer[list(config.layer_types).index("full_attention")]
        head_dim, kv_heads = layer.head_dim, layer.num_key_value_heads
    if not config_get(config, "attention_k_eq_v", False) or kv_heads is None:
        kv_heads = config_get(config, "num_key_value_heads")
    return int(head_dim or config_get(config, "head_dim")), int(kv_heads)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` (Gemma4's final-logit softcapping); unchanged when ``cap`` is 0."""
    return cap * torch.tanh(logits / cap) if cap else logits


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (Qwen3/Llama convention: scale after casting back). ``gemma``: the
    scale is applied in fp32 before casting back, and ``with_scale=False`` gives Gemma4's weightless v norm."""

    def __init__(self, dim: int, eps: float, *, gemma: bool = False, with_scale: bool = True):
        super().__init__()
        if with_scale:
            self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.gemma, self.with_scale = eps, gemma, with_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if not self.with_scale:
            return x32.to(x.dtype)
        if self.gemma:
            return (x32 * self.weight.float()).to(x.dtype)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Plain RoPE with the rotate-half layout of HF Llama/Qwen3.

    The inverse frequencies are recomputed in fp32 on every call (they are tiny) rather than kept in a buffer
    that a ``.to(bfloat16)`` of the drafter would round.
    """

    def __init__(self, head_dim: int, theta: float, rotary_fraction: float = 1.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        # Proportional RoPE (Gemma4's global layers): only the first int(fraction * D / 2) pairs rotate, with the
        # frequencies of the full head dim; the others get frequency 0 (cos 1, sin 0: passed through).
        self.num_rotated = int(rotary_fraction * head_dim // 2)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape ``positions.shape + [D]`` for integer positions."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)
        inv_freq[self.num_rotated:] = 0.0
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., heads, D]`` by cos/sin of shape ``[..., D]`` (broadcast over the heads dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class DraftAttention(nn.Module):
    """Qwen3 attention (GQA, q/k RMSNorm over the head dim, RoPE, no bias) with KV injection."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 variant: LayerVariant = LayerVariant()):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        gemma = variant.gemma4
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        # Gemma4 with attention_k_eq_v: V is the raw k_proj output (before k_norm); no v_proj.
        self.v_proj = None if variant.k_eq_v else nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, eps, gemma=gemma)
        self.k_norm = RMSNorm(head_dim, eps, gemma=gemma)
        # Gemma4: a weightless RMS norm on V, and no 1/sqrt(D) (q/k norms set the logit scale).
        self.v_norm = RMSNorm(head_dim, eps, gemma=True, with_scale=False) if gemma else None
        self.scale = 1.0 if gemma else 1.0 / math.sqrt(head_dim)

    def _kv(self, x_H: torch.Tensor, shape: tuple[int, ...], rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed, rotated) and values of ``x`` viewed as ``shape`` (``[..., G, D]``)."""
        raw_k = self.k_proj(x_H).view(shape)
        v = raw_k if self.v_proj is None else self.v_proj(x_H).view(shape)
        if self.v_norm is not None:
            v = self.v_norm(v)
        return apply_rope(self.k_norm(raw_k), *rope), v

    def forward(self, block_BAKH: torch.Tensor, ctx_BTH: torch.Tensor, anchor_pos_BA: torch.Tensor,
                rope_block: tuple[torch.Tensor, torch.Tensor], rope_ctx: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        """Attend ``block_BAKH`` (already normed) to the context before each anchor and to its own block.

        ``rope_block`` cos/sin are ``[B, A, K, D]`` (block positions), ``rope_ctx`` ``[T, D]`` (positions 0..T-1).
        """
        B, A, K, _ = block_BAKH.shape
        T = ctx_BTH.shape[1]
        G, D = self.num_kv_heads, self.head_dim
        Q = self.num_heads // G

        q_BAKND = apply_rope(self.q_norm(self.q_proj(block_BAKH).view(B, A, K, self.num_heads, D)), *rope_block)
        k_BAKGD, v_BAKGD = self._kv(block_BAKH, (B, A, K, G, D), rope_block)
        k_BTGD, v_BTGD = self._kv(ctx_BTH, (B, T, G, D), rope_ctx)

        # Query head n uses key/value head n // Q (HF repeat_kv order), so split N as (G, Q).
        q_BGQAKD = q_BAKND.view(B, A, K, G, Q, D).permute(0, 3, 4, 1, 2, 5)
        scale = self.scale
        scores_ctx = torch.einsum("bgqakd,btgd->bgqakt", q_BGQAKD, k_BTGD).float() * scale
        scores_blk = torch.einsum("bgqakd,bajgd->bgqakj", q_BGQAKD, k_BAKGD).float() * scale
        # A block sees context positions strictly before its anchor (the anchor token itself is in the block).
        ctx_pos_T = torch.arange(T, device=ctx_BTH.device)
        visible_BAT = ctx_pos_T.view(1, 1, T) < anchor_pos_BA.unsqueeze(-1)
        scores_ctx = scores_ctx.masked_fill(~visible_BAT.view(B, 1, 1, A, 1, T), float("-inf"))
        probs = torch.cat([scores_ctx, scores_blk], dim=-1).softmax(dim=-1).to(v_BTGD.dtype)
        out_BGQAKD = (torch.einsum("bgqakt,btgd->bgqakd", probs[..., :T], v_BTGD)
                      + torch.einsum("bgqakj,bajgd->bgqakd", probs[..., T:], v_BAKGD))
        out_BAKND = out_BGQAKD.permute(0, 3, 4, 1, 2, 5).reshape(B, A, K, self.num_heads * D)
        return self.o_proj(out_BAKND)


class DraftMLP(nn.Module):
    """Gated MLP without bias: SwiGLU, or Gemma's tanh-approximated GELU gate (``gelu``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, gelu: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.gelu(self.gate_proj(x), approximate="tanh") if self.gelu else F.silu(self.gate_proj(x))
        return self.down_proj(gate * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    """Pre-norm Qwen3 decoder layer whose attention also reads the injected context K/V; with a Gemma4 ``variant``
    Gemma4's sandwich layer: x += post_attention_norm(attn(input_norm(x))), then
    x = (x + post_feedforward_norm(mlp(pre_feedforward_norm(x)))) * layer_scalar."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, eps: float, variant: LayerVariant = LayerVariant()):
        super().__init__()
        gemma = variant.gemma4
        self.input_layernorm = RMSNorm(hidden_size, eps, gemma=gemma)
        self.self_attn = DraftAttention(hidden_size, num_heads, num_kv_heads, head_dim, eps, variant)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps, gemma=gemma)
        self.mlp = DraftMLP(hidden_size, intermediate_size, gelu=gemma)
        self.gemma = gemma
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(hidden_size, eps, gemma=True)
            self.post_feedforward_layernorm = RMSNorm(hidden_size, eps, gemma=True)
            self.register_buffer("layer_scalar", torch.ones(1))  # persistent: the reference stores it (1.0)

    def forward(self, block_BAKH, ctx_BTH, anchor_pos_BA, rope_block, rope_ctx) -> torch.Tensor:
        # The context is already normed once by hidden_norm; each layer projects it with its own k/v.
        attn = self.self_attn(self.input_layernorm(block_BAKH), ctx_BTH, anchor_pos_BA, rope_block, rope_ctx)
        if not self.gemma:
            x = block_BAKH + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = block_BAKH + self.post_attention_layernorm(attn)
        return (x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))) * self.layer_scalar
