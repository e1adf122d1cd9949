"""The Eagle3 decoder layer ("midlayer") and its training-time-test attention.

Legend: B batch, T query rows, S key rows of step 0, H hidden size, N query heads, G key/value heads,
Q query heads per key/value head (N = G * Q), D head dim.

The layer is a Llama decoder layer (the SGLang/vLLM ``LlamaForCausalLMEagle3`` midlayer: GQA, RoPE, no q/k norm,
no bias, SwiGLU) whose q/k/v projections read ``[input_layernorm(embed(x)) ; hidden_norm(hidden)]`` (2H wide)
and whose attention residual is the un-normed ``hidden`` input. Two variants follow the reference's deepspec
models (DESIGN 8.1, 8.2): ``qk_norm`` adds Qwen3's q/k RMSNorms over the head dim (``Qwen3Eagle3Model``), and a
Gemma4 ``LayerVariant`` gives Gemma4's layer (``Gemma4Eagle3Model``): Gemma norms, q/k norms, a weightless v norm,
V = the raw k projection when ``attention_k_eq_v``, attention scale 1, sandwich norms around attention and MLP, the
GELU MLP and ``layer_scalar``.

Attention of training-time test (TTT): at step s a query row t sees the step-0 keys/values of the rows ``u <= t``
allowed by ``mask_TS`` (causal in training, the whole context at decode time) plus its own keys/values of steps
1..s (the "diagonal": step j of row t is the same drafted chain, one token further). All scores share one
softmax. The cost per step is one ``[T x S]`` score matrix plus ``s`` row-wise dot products.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dspark.drafters.common import DraftMLP, LayerVariant, RMSNorm, apply_rope


class Eagle3Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 variant: LayerVariant = LayerVariant(), qk_norm: bool = False):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        gemma = variant.gemma4
        self.q_proj = nn.Linear(2 * hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden_size, num_kv_heads * head_dim, bias=False)
        # Gemma4 with attention_k_eq_v: V is the raw k_proj output (before k_norm); no v_proj.
        self.v_proj = None if variant.k_eq_v else nn.Linear(2 * hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = self.k_norm = self.v_norm = None  # the Llama midlayer (SGLang/vLLM) has none
        if qk_norm or gemma:
            self.q_norm = RMSNorm(head_dim, eps, gemma=gemma)
            self.k_norm = RMSNorm(head_dim, eps, gemma=gemma)
        if gemma:  # a weightless RMS norm on V, and no 1/sqrt(D): the q/k norms set the logit scale
            self.v_norm = RMSNorm(head_dim, eps, gemma=True, with_scale=False)
        self.scale = 1.0 if gemma else 1.0 / math.sqrt(head_dim)


class Eagle3Layer(nn.Module):
    """One Eagle3 midlayer; ``qkv`` and ``finish`` bracket the attention so the caller owns the TTT cache."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float, variant: LayerVariant = LayerVariant(), qk_norm: bool = False):
        super().__init__()
        gemma = self.gemma = variant.gemma4
        self.input_layernorm = RMSNorm(hidden_size, eps, gemma=gemma)
        self.hidden_norm = RMSNorm(hidden_size, eps, gemma=gemma)
        self.self_attn = Eagle3Attention(hidden_size, num_heads, num_kv_heads, head_dim, eps, variant, qk_norm)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps, gemma=gemma)
        self.mlp = DraftMLP(hidden_size, intermediate_size, gelu=gemma)
        if gemma:
            self.pre_feedforward_layernorm = RMSNorm(hidden_size, eps, gemma=True)
            self.post_feedforward_layernorm = RMSNorm(hidden_size, eps, gemma=True)
            self.register_buffer("layer_scalar", torch.ones(1))  # persistent: the reference stores it (1.0)

    def qkv(self, embeds_BTH: torch.Tensor, hidden_BTH: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[B, G, Q, T, D]``, keys and values ``[B, G, T, D]`` (RoPE applied with cos/sin ``[B, T, D]``)."""
        attn = self.self_attn
        B, T, _ = embeds_BTH.shape
        G, D = attn.num_kv_heads, attn.head_dim
        Q = attn.num_heads // G
        x_BT2H = torch.cat([self.input_layernorm(embeds_BTH), self.hidden_norm(hidden_BTH)], dim=-1)
        q_BTND = attn.q_proj(x_BT2H).view(B, T, attn.num_heads, D)
        raw_k_BTGD = attn.k_proj(x_BT2H).view(B, T, G, D)
        v_BTGD = raw_k_BTGD if attn.v_proj is None else attn.v_proj(x_BT2H).view(B, T, G, D)
        if attn.q_norm is not None:
            q_BTND, raw_k_BTGD = attn.q_norm(q_BTND), attn.k_norm(raw_k_BTGD)
        if attn.v_norm is not None:
            v_BTGD = attn.v_norm(v_BTGD)
        q_BTND, k_BTGD = apply_rope(q_BTND, *rope), apply_rope(raw_k_BTGD, *rope)
        # Query head n uses key/value head n // Q (HF repeat_kv order), so split N as (G, Q).
        q_BGQTD = q_BTND.view(B, T, G, Q, D).permute(0, 2, 3, 1, 4)
        return q_BGQTD, k_BTGD.transpose(1, 2), v_BTGD.transpose(1, 2)

    def finish(self, hidden_BTH: torch.Tensor, attn_BGQTD: torch.Tensor) -> torch.Tensor:
        """Output projection, residual onto the un-normed hidden input, then the MLP block -> ``[B, T, H]``."""
        B, G, Q, T, D = attn_BGQTD.shape
        out_BTND = attn_BGQTD.permute(0, 3, 1, 2, 4).reshape(B, T, G * Q * D)
        attn_BTH = self.self_attn.o_proj(out_BTND)
        if not self.gemma:
            x_BTH = hidden_BTH + attn_BTH
            return x_BTH + self.mlp(self.post_attention_layernorm(x_BTH))
        # Gemma4's sandwich: each block's output is normed before its residual add, then the whole layer is scaled.
        x_BTH = hidden_BTH + self.post_attention_layernorm(attn_BTH)
        x_BTH = x_BTH + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x_BTH)))
        return x_BTH * self.layer_scalar


def ttt_attention(q_BGQTD: torch.Tensor, k0_BGSD: torch.Tensor, v0_BGSD: torch.Tensor, mask_TS: torch.Tensor,
                  diag: list[tuple[torch.Tensor, torch.Tensor]], scale: float | None = None) -> torch.Tensor:
    """Softmax attention of every query row over the allowed step-0 rows and its own diagonal keys.

    ``mask_TS`` (bool, broadcast against the scores ``[B, G, Q, T, S]``, e.g. ``[T, S]`` or per batch row
    ``[B, 1, 1, T, S]``) says which step-0 rows each query row sees; ``diag`` holds ``(k, v)`` ``[B, G, T, D]`` of
    steps 1..s at the query's own row. ``scale`` multiplies the scores (default ``1 / sqrt(D)``; Gemma4: 1).
    Scores and softmax in fp32.
    """
    scale = 1.0 / math.sqrt(q_BGQTD.shape[-1]) if scale is None else scale
    scores_BGQTS = torch.einsum("bgqtd,bgsd->bgqts", q_BGQTD, k0_BGSD).float() * scale
    scores_BGQTS = scores_BGQTS.masked_fill(~mask_TS, float("-inf"))
    diag_scores = [torch.einsum("bgqtd,bgtd->bgqt", q_BGQTD, k).float().unsqueeze(-1) * scale for k, _ in diag]
    probs = torch.cat([scores_BGQTS, *diag_scores], dim=-1).softmax(dim=-1).to(v0_BGSD.dtype)
    S = k0_BGSD.shape[2]
    out_BGQTD = torch.einsum("bgqts,bgsd->bgqtd", probs[..., :S], v0_BGSD)
    for j, (_, v_BGTD) in enumerate(diag):
        out_BGQTD = out_BGQTD + probs[..., S + j].unsqueeze(-1) * v_BGTD.unsqueeze(2)
    return out_BGQTD
