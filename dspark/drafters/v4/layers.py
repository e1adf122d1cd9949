"""One stage of DeepSeek-V4's DSpark draft (an ``mtp.{s}`` layer): window MLA attention over the context K/V and
the whole block, mHC hyper-connections around attention and the MoE (V4_DSPARK.md section 3, step 4).

Legend: M blocks (batch x anchors, flattened), K block length, C mHC streams, H hidden size, N query heads,
D head dim (one shared K=V head), W context window (128 in V4), T context tokens, E routed experts, G o_groups.

Reused from transformers' ``deepseek_v4`` as they are (same math, same parameter names, so a target layer's
weights load unchanged): ``DeepseekV4HyperConnection`` (hc_pre with Sinkhorn), ``DeepseekV4RMSNorm``,
``DeepseekV4UnweightedRMSNorm``, ``DeepseekV4GroupedLinear``, ``apply_rotary_pos_emb`` (interleaved RoPE on the
trailing rope dims), ``DeepseekV4TopKRouter`` (sqrtsoftplus scores, top-k on score + selection bias, routed
scaling), ``DeepseekV4Experts`` and ``DeepseekV4MLP`` (SwiGLU clamp). Written here: the attention, because the
draft's keys are not the layer's own causal sequence but ``[context window ; block]`` with a non-causal block
(``tests/drafters/test_v4.py`` checks it against ``DeepseekV4Attention`` on the same weights).

Choices where the sources disagree (V4_DSPARK.md section 6), following transformers: comb is applied transposed
(``sum_j comb[j, k] X_j``); the shared expert is clamped like the routed ones; routing is score routing (no hash).
"""

from __future__ import annotations

import torch
from torch import nn


def v4_modules():
    """transformers' DeepSeek-V4 modeling module (imported lazily: transformers is heavy)."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4

    return modeling_deepseek_v4


def rope_cos_sin(config, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``positions.shape + [rope_dim / 2]`` of V4's "main" RoPE (plain theta, no YaRN: the draft layers are
    sliding-window layers). The inverse frequencies are recomputed in fp32 on each call, never held in a buffer
    that a ``.to(bfloat16)`` of the drafter would round."""
    m = v4_modules()
    inv_freq, _ = m.DeepseekV4RotaryEmbedding.compute_default_rope_parameters(config, positions.device,
                                                                               layer_type="main")
    freqs = positions[..., None].float() * inv_freq.float()
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


class WindowAttention(nn.Module):
    """V4's window MLA attention with an attention sink, for draft blocks.

    Queries come from the block only. Keys (= values, one shared head of D dims) are the stage's own
    ``kv_norm(kv_proj(.))`` of (a) the fused target context at the W positions before the anchor and (b) every
    token of the block; the block is non-causal (each slot sees all K block keys). The per-head sink enters the
    softmax denominator only. Parameter names are those of ``DeepseekV4Attention`` (without a compressor).
    Cost per block: ``N * K * (W + K) * D``, independent of the context length.
    """

    def __init__(self, config):
        super().__init__()
        m = v4_modules()
        self.config = config
        self.num_heads, self.head_dim, self.o_groups = config.num_attention_heads, config.head_dim, config.o_groups
        self.scaling = self.head_dim ** -0.5
        eps = config.rms_norm_eps
        self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
        self.q_a_norm = m.DeepseekV4RMSNorm(config.q_lora_rank, eps=eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.q_b_norm = m.DeepseekV4UnweightedRMSNorm(eps=eps)
        self.kv_proj = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.kv_norm = m.DeepseekV4RMSNorm(self.head_dim, eps=eps)
        self.o_a_proj = m.DeepseekV4GroupedLinear(self.num_heads * self.head_dim // self.o_groups,
                                                  self.o_groups * config.o_lora_rank, self.o_groups)
        self.o_b_proj = nn.Linear(self.o_groups * config.o_lora_rank, config.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32))

    def context_kv(self, x_XH: torch.Tensor, cos_sin) -> torch.Tensor:
        """Keys/values ``[..., D]`` of hidden states ``x`` at the positions of ``cos_sin`` (RoPE applied)."""
        kv_X1D = self.kv_norm(self.kv_proj(x_XH)).unsqueeze(-2)
        return v4_modules().apply_rotary_pos_emb(kv_X1D, *cos_sin, unsqueeze_dim=-2).squeeze(-2)

    def forward(self, h_MKH: torch.Tensor, ctx_MWD: torch.Tensor, ctx_valid_MW: torch.Tensor, cos_sin_block
                ) -> torch.Tensor:
        """Attend the (normed) block ``h_MKH`` to its context window ``ctx_MWD`` (invalid slots masked) and to
        itself. ``cos_sin_block`` is ``[M, K, rope_dim / 2]`` at the block's absolute positions."""
        m = v4_modules()
        M, K, _ = h_MKH.shape
        N, D = self.num_heads, self.head_dim
        q_MKND = self.q_b_norm(self.q_b_proj(self.q_a_norm(self.q_a_proj(h_MKH))).view(M, K, N, D))
        q_MKND = m.apply_rotary_pos_emb(q_MKND, *cos_sin_block, unsqueeze_dim=-2)
        kv_MKD = self.context_kv(h_MKH, cos_sin_block)
        scores_ctx = torch.einsum("mknd,mwd->mnkw", q_MKND, ctx_MWD).float() * self.scaling
        scores_blk = torch.einsum("mknd,mjd->mnkj", q_MKND, kv_MKD).float() * self.scaling
        scores_ctx = scores_ctx.masked_fill(~ctx_valid_MW.view(M, 1, 1, -1), float("-inf"))
        sink_MNK1 = self.sinks.float().view(1, N, 1, 1).expand(M, N, K, 1)
        # One softmax over [window ; block ; sink]; the sink's column is dropped (it has no value).
        probs = torch.cat([scores_ctx, scores_blk, sink_MNK1], dim=-1).softmax(dim=-1)[..., :-1]
        W = ctx_MWD.shape[1]
        probs = probs.to(kv_MKD.dtype)
        out_MNKD = (torch.einsum("mnkw,mwd->mnkd", probs[..., :W], ctx_MWD)
                    + torch.einsum("mnkj,mjd->mnkd", probs[..., W:], kv_MKD))
        # K = V carries RoPE on its rope dims: rotate the output back at the query position (conjugate rotation).
        cos, sin = cos_sin_block
        out_MKND = m.apply_rotary_pos_emb(out_MNKD.transpose(1, 2), cos, -sin, unsqueeze_dim=-2)
        grouped = self.o_a_proj(out_MKND.reshape(M, K, self.o_groups, -1)).flatten(2)
        return self.o_b_proj(grouped)


class DraftMoE(nn.Module):
    """V4's score-routed MoE (router, routed experts, one shared expert), counting each expert's tokens.

    ``expert_counts_E`` accumulates (in training) how many token slots chose each expert since the last
    ``take_expert_counts``: the load the aux-loss-free balancing of the selection bias reads
    (``DSparkV4Drafter.update_selection_bias``). ``experts`` may be swapped from outside for an expert-parallel
    version with the same call signature.
    """

    def __init__(self, config):
        super().__init__()
        m = v4_modules()
        self.gate = m.DeepseekV4TopKRouter(config)
        self.experts = m.DeepseekV4Experts(config)
        self.shared_experts = m.DeepseekV4MLP(config)
        self.num_experts = config.n_routed_experts
        self.expert_counts_E: torch.Tensor | None = None

    def forward(self, h_MKH: torch.Tensor) -> torch.Tensor:
        flat_XH = h_MKH.reshape(-1, h_MKH.shape[-1])
        _, weights, indices = self.gate(flat_XH)
        if self.training:
            counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts).float()
            self.expert_counts_E = counts if self.expert_counts_E is None else self.expert_counts_E + counts
        routed_XH = self.experts(flat_XH, indices, weights.to(flat_XH.dtype))
        return (routed_XH + self.shared_experts(flat_XH)).view_as(h_MKH)

    def take_expert_counts(self) -> torch.Tensor | None:
        counts, self.expert_counts_E = self.expert_counts_E, None
        return counts


class DraftStage(nn.Module):
    """One ``mtp.{s}`` stage: ``hc_pre -> window attention -> hc_post``, then ``hc_pre -> MoE -> hc_post``, on
    ``[M, K, C, H]`` streams. Parameter names are ``DeepseekV4DecoderLayer``'s."""

    def __init__(self, config):
        super().__init__()
        m = v4_modules()
        eps = config.rms_norm_eps
        self.attn_hc = m.DeepseekV4HyperConnection(config)
        self.self_attn = WindowAttention(config)
        self.input_layernorm = m.DeepseekV4RMSNorm(config.hidden_size, eps=eps)
        self.ffn_hc = m.DeepseekV4HyperConnection(config)
        self.mlp = DraftMoE(config)
        self.post_attention_layernorm = m.DeepseekV4RMSNorm(config.hidden_size, eps=eps)

    def forward(self, x_MKCH: torch.Tensor, ctx_MWD: torch.Tensor, ctx_valid_MW: torch.Tensor, cos_sin_block
                ) -> torch.Tensor:
        dtype = x_MKCH.dtype
        post, comb, collapsed = self.attn_hc(x_MKCH)
        a_MKH = self.self_attn(self.input_layernorm(collapsed), ctx_MWD, ctx_valid_MW, cos_sin_block)
        # hc_post: X'_k = post_k a + sum_j comb[j, k] X_j (transformers' direction, see the module docstring).
        x_MKCH = post.to(dtype).unsqueeze(-1) * a_MKH.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ x_MKCH
        post, comb, collapsed = self.ffn_hc(x_MKCH)
        f_MKH = self.mlp(self.post_attention_layernorm(collapsed))
        return post.to(dtype).unsqueeze(-1) * f_MKH.unsqueeze(-2) + comb.to(dtype).transpose(-1, -2) @ x_MKCH


def gather_windows(kv_BTD: torch.Tensor, anchor_row_BA: torch.Tensor, window: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``window`` context rows before each anchor: ``([B*A, W, D], valid [B*A, W])``.

    ``anchor_row_BA`` is the anchor's row in ``kv_BTD`` (rows before it are its context); rows before row 0 are
    invalid (masked). Gathering W rows per block keeps attention cost independent of T.
    """
    B, T, D = kv_BTD.shape
    idx_BAW = anchor_row_BA.unsqueeze(-1) - window + torch.arange(window, device=kv_BTD.device)
    valid_BAW = idx_BAW >= 0
    idx_BAW = idx_BAW.clamp(min=0, max=max(T - 1, 0))
    A = anchor_row_BA.shape[1]
    gathered = kv_BTD.gather(1, idx_BAW.reshape(B, A * window, 1).expand(-1, -1, D))
    return gathered.view(B * A, window, D), valid_BAW.view(B * A, window)

