"""Eagle3 midlayers of the reference's deepspec models. On a Gemma4 target (DESIGN 8.2) the TTT steps equal the
reference's Gemma4 Eagle3 forward written with transformers' own Gemma4 modules (sandwich and q/k/v norms, K = V,
global geometry, proportional RoPE, GELU MLP, sqrt(H) embedding, attention scale 1, softcapped logits), the
softcapped soft cross-entropy has autograd's gradient, and the loss compares softcapped draft and target
distributions. With ``drafter.eagle3.qk_norm`` (DESIGN 8.1) a step equals the Qwen3Eagle3Model layer written with
transformers' Qwen3 modules (q/k RMSNorm before RoPE)."""

import pytest
import torch
import torch.nn.functional as F

from dspark.config import DrafterConfig, Eagle3Config
from dspark.drafters import build_drafter
from dspark.drafters.eagle3.loss import soft_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")
V, H, CAP = 300, 64, 30.0
LAYER_IDS = [0, 1, 2]


def _target_config():
    from dspark.targets.tiny_gemma4 import tiny_gemma4_config

    return tiny_gemma4_config(V, 4)


def _drafter(ttt_length: int = 2):
    torch.manual_seed(0)
    cfg = DrafterConfig(algorithm="eagle3", block_size=4, eagle3=Eagle3Config(ttt_length=ttt_length))
    embed = torch.randn(V, H)
    d = build_drafter(cfg, _target_config(), LAYER_IDS, embed, embed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn_like(p))
        d.midlayer.layer_scalar.fill_(0.7)
    return d


def _reference_ttt(d, config, batch, steps: int) -> list[torch.Tensor]:
    """The reference's Gemma4 Eagle3 TTT (DESIGN 8.2) from transformers' Gemma4 modules, with ``d``'s weights.

    Step s: token of row t is ``x_{t+1+s}`` (0 past the end), position ``t + s``; row t attends to the step-0 rows
    ``u <= t`` and to its own rows of steps 1..s. Returns the softcapped logits of every step."""
    from transformers.models.gemma4.modeling_gemma4 import (
        Gemma4RMSNorm,
        Gemma4TextMLP,
        Gemma4TextRotaryEmbedding,
        Gemma4TextScaledWordEmbedding,
        apply_rotary_pos_emb,
    )

    layer, attn = d.midlayer, d.midlayer.self_attn

    def norm(dim, weight=None):
        n = Gemma4RMSNorm(dim, eps=config.rms_norm_eps, with_scale=weight is not None)
        if weight is not None:
            n.weight.data.copy_(weight)
        return n

    embed = Gemma4TextScaledWordEmbedding(V, H, 0, embed_scale=H ** 0.5)
    embed.weight.data.copy_(d.embed_tokens.weight)
    mlp = Gemma4TextMLP(config, 0)
    mlp.load_state_dict(layer.mlp.state_dict())
    rotary = Gemma4TextRotaryEmbedding(config)
    ids, (B, T) = batch["input_ids_BT"], batch["input_ids_BT"].shape
    nH, nKV, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    hidden = d.fc(batch["features_BTLH"].reshape(B, T, -1))
    keys, values, logits = [], [], []
    t = torch.arange(T)
    for s in range(steps):
        tokens = torch.zeros_like(ids)
        tokens[:, : T - 1 - s] = ids[:, 1 + s:]
        x = torch.cat([norm(H, layer.input_layernorm.weight)(embed(tokens)),
                       norm(H, layer.hidden_norm.weight)(hidden)], dim=-1)
        q = norm(D, attn.q_norm.weight)(attn.q_proj(x).view(B, T, nH, D))
        raw_k = attn.k_proj(x).view(B, T, nKV, D)
        v = norm(D)(raw_k)  # attention_k_eq_v: V is the raw k projection, then the weightless v norm
        k = norm(D, attn.k_norm.weight)(raw_k)
        cos, sin = rotary(x, (t + s).expand(B, T), "full_attention")
        q, k = apply_rotary_pos_emb(q, cos, sin, unsqueeze_dim=2), apply_rotary_pos_emb(k, cos, sin, unsqueeze_dim=2)
        keys.append(k.repeat_interleave(nH // nKV, dim=2))
        values.append(v.repeat_interleave(nH // nKV, dim=2))
        scores = torch.einsum("btnd,bjsnd->bntjs", q, torch.stack(keys, 1))  # scale 1.0
        allowed = torch.stack([t[None] <= t[:, None]] + [torch.eye(T, dtype=torch.bool)] * s, dim=1)  # [T, j, S]
        scores = scores.masked_fill(~allowed, float("-inf")).flatten(-2).softmax(-1).view_as(scores)
        out = torch.einsum("bntjs,bjsnd->btnd", scores, torch.stack(values, 1)).reshape(B, T, nH * D)
        h = hidden + norm(H, layer.post_attention_layernorm.weight)(attn.o_proj(out))
        mlp_out = mlp(norm(H, layer.pre_feedforward_layernorm.weight)(h))
        hidden = (h + norm(H, layer.post_feedforward_layernorm.weight)(mlp_out)) * layer.layer_scalar
        z = d.lm_head.weight @ norm(H, d.norm.weight)(hidden).unsqueeze(-1)
        logits.append(CAP * torch.tanh(z.squeeze(-1) / CAP))
    return logits


def _batch(T: int = 10):
    g = torch.Generator().manual_seed(1)
    return {"input_ids_BT": torch.randint(0, V, (2, T), generator=g),
            "loss_mask_BT": torch.ones(2, T, dtype=torch.bool),
            "features_BTLH": torch.randn(2, T, 3, H, generator=g),
            "final_BTH": 3 * torch.randn(2, T, H, generator=g)}


def test_ttt_steps_equal_the_reference_gemma4_eagle3_forward():
    config, d, batch = _target_config(), _drafter(), _batch()
    assert d.midlayer.self_attn.v_proj is None and d.midlayer.self_attn.head_dim == 32  # global geometry, K = V
    with torch.no_grad():
        ours = [d.draft_logits(h) for h in d.ttt_hidden(batch)]
        ref = _reference_ttt(d, config, batch, 2)
    for s in range(2):
        torch.testing.assert_close(ours[s], ref[s], atol=2e-5, rtol=1e-5)
    assert ours[0].abs().max() <= CAP

    # The loss is the soft cross-entropy of those logits against the softcapped target distribution.
    out = d.forward_loss(batch)
    T, expected = 10, 0.0
    target = (CAP * torch.tanh(batch["final_BTH"] @ d.lm_head.weight.T / CAP)).softmax(-1)
    for s in range(2):
        rows = slice(0, T - 2 - s)  # row t predicts token t+2+s from the target at position t+1+s
        ce = -(target[:, 1 + s: T - 1] * ref[s][:, rows].log_softmax(-1)).sum(-1)
        expected += 0.8 ** s * ce.sum()
    torch.testing.assert_close(out.numerator, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("pruned", [False, True])
def test_softcapped_soft_cross_entropy_gradient_is_the_autograd_one(pruned):
    g = torch.Generator().manual_seed(0)
    N, cap = 9, 4.0
    h = torch.randn(N, H, generator=g, requires_grad=True)
    lm, final = torch.randn(V, H, generator=g), torch.randn(N, H, generator=g)
    ids = torch.randperm(V, generator=g)[:40] if pruned else None
    lm_draft = lm[ids] if pruned else lm
    coef = torch.rand(N, generator=g)
    loss, ce, _ = soft_cross_entropy(h, lm_draft, lm, final, ids, coef, chunk_rows=4, softcap=cap)
    loss.backward()
    ours = h.grad.clone()
    h.grad = None
    target_logits = cap * torch.tanh(final @ lm.T / cap)
    target = (target_logits[:, ids] if pruned else target_logits).softmax(-1)
    ref_ce = -(target * (cap * torch.tanh(h @ lm_draft.T / cap)).log_softmax(-1)).sum(-1)
    (coef * ref_ce).sum().backward()
    torch.testing.assert_close(ce, ref_ce.detach())
    torch.testing.assert_close(ours, h.grad, atol=1e-5, rtol=1e-4)


def test_gemma4_eagle3_refuses_what_its_layout_cannot_hold():
    config, embed = _target_config(), torch.randn(V, H)
    with pytest.raises(ValueError, match=r"layer_ids \[-1, 0, 2\]: Eagle3 with a Gemma4 target reads decoder layers"):
        build_drafter(DrafterConfig(algorithm="eagle3"), config, [-1, 0, 2], embed, embed)
    with pytest.raises(ValueError, match="draft_vocab_size 64: Eagle3 with a Gemma4 target drafts over the full"):
        build_drafter(DrafterConfig(algorithm="eagle3", eagle3=Eagle3Config(draft_vocab_size=64)), config, LAYER_IDS,
                      embed, embed)


def test_qk_norm_midlayer_equals_the_reference_qwen3_eagle3_step():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import (
        Qwen3MLP,
        Qwen3RMSNorm,
        Qwen3RotaryEmbedding,
        apply_rotary_pos_emb,
    )

    config = Qwen3Config(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    cfg = DrafterConfig(algorithm="eagle3", eagle3=Eagle3Config(ttt_length=1, qk_norm=True))
    d = build_drafter(cfg, config, LAYER_IDS, torch.randn(V, H), torch.randn(V, H) / 8)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer, attn = d.midlayer, d.midlayer.self_attn

    def norm(dim, weight):
        n = Qwen3RMSNorm(dim, eps=config.rms_norm_eps)
        n.weight.data.copy_(weight)
        return n

    mlp = Qwen3MLP(config)
    mlp.load_state_dict(layer.mlp.state_dict())
    batch = _batch()
    ids, (B, T) = batch["input_ids_BT"], batch["input_ids_BT"].shape
    hidden = d.fc(batch["features_BTLH"].reshape(B, T, -1))
    tokens = torch.zeros_like(ids)
    tokens[:, : T - 1] = ids[:, 1:]
    x = torch.cat([norm(H, layer.input_layernorm.weight)(d.embed_tokens.weight[tokens]),
                   norm(H, layer.hidden_norm.weight)(hidden)], dim=-1)
    q = norm(16, attn.q_norm.weight)(attn.q_proj(x).view(B, T, 4, 16)).transpose(1, 2)
    k = norm(16, attn.k_norm.weight)(attn.k_proj(x).view(B, T, 2, 16)).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, 2, 16).transpose(1, 2)
    cos, sin = Qwen3RotaryEmbedding(config)(x, torch.arange(T).expand(B, T))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    h = hidden + attn.o_proj(out.transpose(1, 2).reshape(B, T, 64))
    expected = h + mlp(norm(H, layer.post_attention_layernorm.weight)(h))
    with torch.no_grad():
        torch.testing.assert_close(d.ttt_hidden(batch)[0], expected, atol=1e-5, rtol=1e-5)
