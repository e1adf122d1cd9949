"""DeepSeek-V3 blocks for ``model.py``: multi-head latent attention (MLA) and the routed + shared MoE.

Parallel layout (``p`` = tensor-parallel size; experts are split over the same ranks, so expert parallel = p):
- MLA: the low-rank down projections (``q_a_proj``, ``kv_a_proj_with_mqa``) and their norms are replicated;
  the per-head up projections (``q_b_proj`` / ``q_proj``, ``kv_b_proj``) are column parallel by heads and
  ``o_proj`` row parallel. The KV cache keeps the compressed latent (shared by all heads), not per-head K/V.
- MoE: the router is replicated (hidden states are replicated within the TP group, so every rank routes
  identically); each rank runs only its ``n_routed_experts / p`` experts on the tokens routed to them and the
  partial outputs are summed over the group; shared experts are an ordinary TP-split SwiGLU MLP.
Numerics follow transformers' modeling_deepseek_v3 (sigmoid scores, grouped top-k with the score correction
bias, normalised top-k weights times ``routed_scaling_factor``, yarn mscale on the softmax scale).

Legend: B batch, T new tokens, S key slots, H hidden, N local heads, R kv_lora_rank, d rope dims, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MLASpec:
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    softmax_scale: float


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    num_shared_experts: int
    num_groups: int
    topk_groups: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense: int


def deepseek_specs(cfg) -> tuple[MLASpec, MoESpec]:
    """The MLA and MoE fields of an HF ``deepseek_v3`` config."""
    qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    scale = qk_head_dim**-0.5
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        factor = rope["factor"]
        mscale = 0.1 * rope["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale *= mscale * mscale
    mla = MLASpec(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                  qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                  rope_interleave=bool(getattr(cfg, "rope_interleave", True)), softmax_scale=scale)
    moe = MoESpec(num_experts=cfg.n_routed_experts, experts_per_token=cfg.num_experts_per_tok,
                  moe_intermediate_size=cfg.moe_intermediate_size, num_shared_experts=cfg.n_shared_experts or 0,
                  num_groups=cfg.n_group or 1, topk_groups=cfg.topk_group or 1,
                  norm_topk_prob=bool(cfg.norm_topk_prob), routed_scaling_factor=float(cfg.routed_scaling_factor),
                  first_k_dense=cfg.first_k_dense_replace or 0)
    return mla, moe


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    if not interleave:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    # DeepSeek's interleaved pairs (x0, x1), (x2, x3), ... each rotate by one frequency (HF's form).
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LatentAttention(nn.Module):
    def __init__(self, spec, layers, layer_idx: int):
        from dspark.targets.megatron.model import RMSNorm

        super().__init__()
        mla: MLASpec = spec.mla
        self.mla = mla
        self.layer_idx = layer_idx
        self.num_local_heads = spec.num_heads // layers.tp_size
        H, n, bias = spec.hidden_size, spec.num_heads, spec.attention_bias
        qk_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = layers.column(H, n * qk_head_dim, False)
        else:
            self.q_a_proj = nn.Linear(H, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, 1e-6)  # HF builds these two norms with the default eps
            self.q_b_proj = layers.column(mla.q_lora_rank, n * qk_head_dim, False)
        self.kv_a_proj_with_mqa = nn.Linear(H, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, 1e-6)
        self.kv_b_proj = layers.column(mla.kv_lora_rank, n * (mla.qk_nope_head_dim + mla.v_head_dim), False)
        self.o_proj = layers.row(n * mla.v_head_dim, H, bias)

    def forward(self, x_BTH, cos_BTd, sin_BTd, bias_B1TS, cache):
        mla, N = self.mla, self.num_local_heads
        B, T, _ = x_BTH.shape
        q = self.q_proj(x_BTH) if mla.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTH)))
        q_BNTD = q.view(B, T, N, -1).transpose(1, 2)
        q_pass, q_rot = q_BNTD.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        latent_BTc = self.kv_a_proj_with_mqa(x_BTH)
        kv_BTR, k_rot_BTd = latent_BTc.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        kv_B1TR = self.kv_a_layernorm(kv_BTR).unsqueeze(1)
        cos, sin = cos_BTd.unsqueeze(1), sin_BTd.unsqueeze(1)
        q_rot = _rope(q_rot, cos, sin, mla.rope_interleave)
        k_rot_B1Td = _rope(k_rot_BTd.unsqueeze(1), cos, sin, mla.rope_interleave)
        if cache is not None:  # the compressed latent is the cache: R + d numbers per token, all heads
            kv_B1TR, k_rot_B1Td = cache.append(self.layer_idx, kv_B1TR, k_rot_B1Td)
        S = kv_B1TR.shape[2]
        kv_BNSD = self.kv_b_proj(kv_B1TR[:, 0]).view(B, S, N, -1).transpose(1, 2)
        k_nope, v_BNSD = kv_BNSD.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        k_BNSD = torch.cat([k_nope, k_rot_B1Td.expand(-1, N, -1, -1)], dim=-1)
        q_BNTD = torch.cat([q_pass, q_rot], dim=-1)
        scores = torch.matmul(q_BNTD, k_BNSD.transpose(2, 3)) * mla.softmax_scale + bias_B1TS
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_BNTD.dtype)
        out_BTN_ = torch.matmul(probs, v_BNSD).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out_BTN_)


class Router(nn.Module):
    """Sigmoid scores, best ``topk_groups`` groups (by their top-2 sum, with the correction bias), top-k."""

    keep_fp32 = True  # routing in fp32 whatever the model dtype, as HF does

    def __init__(self, hidden_size: int, moe: MoESpec):
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.zeros(moe.num_experts, hidden_size, dtype=torch.float32))
        # A buffer in HF; a frozen parameter here so the checkpoint loader fills it like any weight.
        self.e_score_correction_bias = nn.Parameter(torch.zeros(moe.num_experts, dtype=torch.float32))

    def forward(self, x_MH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moe, E = self.moe, self.moe.num_experts
        scores_ME = F.linear(x_MH.float(), self.weight.float()).sigmoid()
        choice_ME = scores_ME + self.e_score_correction_bias
        group_MG = choice_ME.view(-1, moe.num_groups, E // moe.num_groups).topk(2, dim=-1)[0].sum(dim=-1)
        keep_MG = torch.zeros_like(group_MG).scatter_(1, group_MG.topk(moe.topk_groups, dim=-1)[1], 1)
        keep_ME = keep_MG.unsqueeze(-1).expand(-1, moe.num_groups, E // moe.num_groups).reshape(-1, E)
        top_Mk = choice_ME.masked_fill(~keep_ME.bool(), float("-inf")).topk(moe.experts_per_token, dim=-1)[1]
        weights_Mk = scores_ME.gather(1, top_Mk)
        if moe.norm_topk_prob:
            weights_Mk = weights_Mk / (weights_Mk.sum(dim=-1, keepdim=True) + 1e-20)
        return top_Mk, weights_Mk * moe.routed_scaling_factor


class MoE(nn.Module):
    def __init__(self, spec, layers, all_reduce):
        from dspark.targets.megatron.model import MLP

        super().__init__()
        moe: MoESpec = spec.moe
        tp, H, inter = layers.tp_size, spec.hidden_size, moe.moe_intermediate_size
        self.num_local = moe.num_experts // tp
        self.first_expert = layers.tp_rank * self.num_local
        self.all_reduce = all_reduce
        self.gate = Router(H, moe)
        # HF's fused layout: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]; local experts only.
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.empty(self.num_local, 2 * inter, H))
        self.experts.down_proj = nn.Parameter(torch.empty(self.num_local, H, inter))
        self.shared_experts = MLP(spec, layers, inter * moe.num_shared_experts) if moe.num_shared_experts else None

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        x_MH = x_BTH.reshape(-1, x_BTH.shape[-1])
        top_Mk, weights_Mk = self.gate(x_MH)
        out_MH = torch.zeros_like(x_MH)
        for local in range(self.num_local):
            token_idx, slot = torch.where(top_Mk == self.first_expert + local)
            if token_idx.numel() == 0:
                continue
            gate, up = F.linear(x_MH[token_idx], self.experts.gate_up_proj[local]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.experts.down_proj[local]) * weights_Mk[token_idx, slot, None]
            out_MH.index_add_(0, token_idx, y.to(out_MH.dtype))
        out_BTH = self.all_reduce(out_MH).view_as(x_BTH)  # every expert's contribution, from whichever rank
        return out_BTH + self.shared_experts(x_BTH) if self.shared_experts is not None else out_BTH
