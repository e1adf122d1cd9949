"""Building blocks shared by the parallel drafters: RMSNorm, RoPE, and a Qwen3 decoder layer with KV injection.

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

import torch
import torch.nn.functional as F
from torch import nn


def config_get(config, key: str, default=None):
    """Read ``key`` from an HF config object or a plain dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


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


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (Qwen3/Llama convention: scale after casting back)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Plain RoPE with the rotate-half layout of HF Llama/Qwen3.

    The inverse frequencies are recomputed in fp32 on every call (they are tiny) rather than kept in a buffer
    that a ``.to(bfloat16)`` of the drafter would round.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape ``positions.shape + [D]`` for integer positions."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)
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

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

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
        k_BAKGD = apply_rope(self.k_norm(self.k_proj(block_BAKH).view(B, A, K, G, D)), *rope_block)
        v_BAKGD = self.v_proj(block_BAKH).view(B, A, K, G, D)
        k_BTGD = apply_rope(self.k_norm(self.k_proj(ctx_BTH).view(B, T, G, D)), *rope_ctx)
        v_BTGD = self.v_proj(ctx_BTH).view(B, T, G, D)

        # Query head n uses key/value head n // Q (HF repeat_kv order), so split N as (G, Q).
        q_BGQAKD = q_BAKND.view(B, A, K, G, Q, D).permute(0, 3, 4, 1, 2, 5)
        scale = 1.0 / math.sqrt(D)
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
    """SwiGLU MLP without bias."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftDecoderLayer(nn.Module):
    """Pre-norm Qwen3 decoder layer whose attention also reads the injected context K/V."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attn = DraftAttention(hidden_size, num_heads, num_kv_heads, head_dim, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = DraftMLP(hidden_size, intermediate_size)

    def forward(self, block_BAKH, ctx_BTH, anchor_pos_BA, rope_block, rope_ctx) -> torch.Tensor:
        # The context is already normed once by hidden_norm; each layer projects it with its own k/v.
        x = block_BAKH + self.self_attn(self.input_layernorm(block_BAKH), ctx_BTH, anchor_pos_BA, rope_block,
                                        rope_ctx)
        return x + self.mlp(self.post_attention_layernorm(x))
