import pytest
import torch
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

from dspark.drafters.common import DraftAttention, RMSNorm, RotaryEmbedding, apply_rope, rope_theta_from_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rope_and_rmsnorm_match_transformers_qwen3():
    cfg = Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=16,
                      rope_parameters={"rope_theta": 5000.0, "rope_type": "default"})
    hf_rope = Qwen3RotaryEmbedding(cfg)
    positions = torch.arange(3, 13).view(1, 10)
    x = torch.randn(1, 4, 10, 16)  # HF layout [B, heads, T, D]
    cos, sin = hf_rope(x, positions)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    ours_cos, ours_sin = RotaryEmbedding(16, rope_theta_from_config(cfg)).cos_sin(positions, torch.float32)
    ours = apply_rope(x.transpose(1, 2), ours_cos, ours_sin).transpose(1, 2)  # ours: [B, T, heads, D]
    torch.testing.assert_close(ours, expected)

    hf_norm, norm = Qwen3RMSNorm(64, eps=1e-6), RMSNorm(64, 1e-6)
    with torch.no_grad():
        hf_norm.weight.normal_()
        norm.weight.copy_(hf_norm.weight)
    h = torch.randn(5, 64).bfloat16()
    torch.testing.assert_close(norm.to(torch.bfloat16)(h), hf_norm.to(torch.bfloat16)(h))


def test_rope_theta_sources():
    assert rope_theta_from_config({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}) == 1e6
    assert rope_theta_from_config({"rope_theta": 500.0}) == 500.0
    with pytest.warns(UserWarning, match="rope_type 'yarn'"):
        rope_theta_from_config({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn"}})
    with pytest.raises(ValueError, match="neither rope_parameters"):
        rope_theta_from_config({})


def test_block_attention_is_bidirectional_inside_a_block_and_sees_only_earlier_context():
    torch.manual_seed(0)
    attn = DraftAttention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, eps=1e-6)
    rope = RotaryEmbedding(8, 10000.0)
    B, A, K, T = 1, 2, 4, 10
    block = torch.randn(B, A, K, 32)
    ctx = torch.randn(B, T, 32)
    anchors = torch.tensor([[3, 7]])
    rope_block = rope.cos_sin(anchors.unsqueeze(-1) + torch.arange(K), torch.float32)
    rope_ctx = rope.cos_sin(torch.arange(T), torch.float32)

    def run(block, ctx):
        return attn(block, ctx, anchors, rope_block, rope_ctx)

    base = run(block, ctx)
    # The last token of block 0 changes every slot of block 0 (also the earlier ones), none of block 1.
    b2 = block.clone()
    b2[0, 0, K - 1] += 1.0
    out = run(b2, ctx)
    assert (out[0, 0] - base[0, 0]).abs().amax(dim=-1).min() > 1e-4
    torch.testing.assert_close(out[0, 1], base[0, 1], rtol=0, atol=0)
    # Context positions < anchor are visible: 3 (block 0's own anchor) only to block 1, 7 and 9 to neither.
    for t, changed in ((3, [False, True]), (6, [False, True]), (7, [False, False]), (9, [False, False]),
                       (2, [True, True])):
        c2 = ctx.clone()
        c2[0, t] += 1.0
        out = run(block, c2)
        assert [bool((out[0, a] - base[0, a]).abs().max() > 1e-5) for a in range(A)] == changed, t
