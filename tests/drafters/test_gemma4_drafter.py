"""DSpark / DFlash drafters on a Gemma4 target (DESIGN 8.2): a draft layer equals transformers' Gemma4 decoder layer
with the global attention geometry, the softcapped chunked loss has the gradient autograd gives, and the deepspec
export is the reference's Gemma4DSparkModel layout (names, shapes, config fields) and round-trips."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dspark.config import DrafterConfig, DSparkConfig
from dspark.drafters import build_drafter
from dspark.drafters.common import DraftDecoderLayer, layer_variant
from dspark.drafters.dspark.loss import chunked_vocab_loss
from dspark.export import load_drafter
from dspark.export.deepspec import export_deepspec

pytestmark = pytest.mark.usefixtures("one_thread")
V, H = 300, 64
LAYER_IDS = [-1, 0, 2]


def _target_config():
    from dspark.targets.tiny_gemma4 import tiny_gemma4_config

    return tiny_gemma4_config(V, 4)


def test_draft_layer_equals_transformers_gemma4_global_layer():
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer, Gemma4TextRotaryEmbedding

    config = _target_config()
    config._attn_implementation = "eager"
    full = config.layer_types.index("full_attention")
    torch.manual_seed(0)
    ref = Gemma4TextDecoderLayer(config, full).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
        ref.layer_scalar.fill_(0.7)
    variant = layer_variant(config)
    assert variant.gemma4 and variant.k_eq_v and variant.rotary_fraction == 0.25 and variant.softcap == 30.0
    ours = DraftDecoderLayer(H, 128, 4, 1, 32, config.rms_norm_eps, variant)
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and not unexpected  # same names: the deepspec layer tensors are transformers' own
    assert ours.self_attn.v_proj is None

    # One block of K tokens at positions p..p+K-1 with no visible context (anchor at 0): bidirectional attention.
    from dspark.drafters.common import RotaryEmbedding

    K, p = 6, 0
    x_11KH = torch.randn(1, 1, K, H)
    rope = RotaryEmbedding(32, config.rope_parameters["full_attention"]["rope_theta"], variant.rotary_fraction)
    pos_11K = torch.arange(p, p + K).view(1, 1, K)
    ctx_1TH = torch.randn(1, 3, H)
    out = ours(x_11KH, ctx_1TH, torch.zeros(1, 1, dtype=torch.long), rope.cos_sin(pos_11K, x_11KH.dtype),
               rope.cos_sin(torch.arange(3), x_11KH.dtype))
    position_ids = torch.arange(p, p + K).view(1, K)
    cos_sin = Gemma4TextRotaryEmbedding(config)(x_11KH[0], position_ids, "full_attention")
    expected = ref(x_11KH[0], position_embeddings=cos_sin, attention_mask=torch.zeros(1, 1, K, K),
                   position_ids=position_ids, shared_kv_states={})
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_softcapped_chunked_loss_matches_autograd():
    g = torch.Generator().manual_seed(0)
    N, R, cap = 11, 4, 5.0
    h = torch.randn(N, H, generator=g, requires_grad=True)
    u = torch.randn(N, R, generator=g, requires_grad=True)
    w2 = torch.randn(V, R, generator=g, requires_grad=True)
    lm, final = torch.randn(V, H, generator=g), torch.randn(N, H, generator=g)
    labels, a, b = torch.randint(0, V, (N,), generator=g), torch.rand(N, generator=g), torch.rand(N, generator=g)
    loss, ce, l1 = chunked_vocab_loss(h, u, w2, lm, final, labels, a, b, chunk_rows=4, softcap=cap)
    loss.backward()
    grads = [t.grad.clone() for t in (h, u, w2)]
    for t in (h, u, w2):
        t.grad = None
    logp = (cap * torch.tanh(h @ lm.T / cap) + u @ w2.T).log_softmax(-1)
    target = (cap * torch.tanh(final @ lm.T / cap)).softmax(-1)
    ref_ce = -logp.gather(1, labels[:, None])[:, 0]
    ref_l1 = (logp.exp() - target).abs().sum(-1)
    ref = (a * ref_ce + b * ref_l1).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(ce, ref_ce.detach())
    for ours, theirs in zip(grads, (h.grad, u.grad, w2.grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("algorithm", ["dspark", "dflash"])
def test_deepspec_export_is_the_gemma4_contract(algorithm, tmp_path):
    config = _target_config()
    torch.manual_seed(0)
    embed = torch.randn(V, H)
    extra = dict(dspark=DSparkConfig(markov_rank=8, markov_head_type="rnn")) if algorithm == "dspark" else {}
    cfg = DrafterConfig(algorithm=algorithm, num_layers=2, num_anchors=4, mask_token_id=4, **extra)
    drafter = build_drafter(cfg, config, LAYER_IDS, embed, embed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export_deepspec(drafter, config, tmp_path / "export")
    exported = json.loads((out / "config.json").read_text())
    tensors = load_file(str(out / "model.safetensors"))

    assert exported["architectures"] == ["Gemma4DSparkModel"] and exported["model_type"] == "gemma4_text"
    assert (exported["target_model_type"], exported["target_text_model_type"]) == ("gemma4", "gemma4_text")
    target = config.to_dict()
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "sliding_window", "final_logit_softcapping", "attention_k_eq_v", "hidden_activation",
                  "rms_norm_eps", "vocab_size", "max_position_embeddings"):
        assert exported[field] == target[field], field
    assert (exported["global_head_dim"], exported["num_global_key_value_heads"]) == (32, 1)
    rope = exported["rope_parameters"]
    assert rope["full_attention"] == config.rope_parameters["full_attention"]
    assert rope["sliding_attention"] == config.rope_parameters["sliding_attention"]
    assert (rope["rope_type"], rope["rope_theta"]) == ("default", None)
    assert exported["num_hidden_layers"] == 2 and exported["layer_types"] == ["full_attention"] * 2
    assert exported["num_target_layers"] == 4 and exported["target_layer_ids"] == LAYER_IDS
    assert exported["mask_token_id"] == 4 and exported["tie_word_embeddings"] is False
    assert exported["block_size"] == 7 and exported["num_anchors"] == 4
    assert exported["enable_confidence_head"] is (algorithm == "dspark")
    assert exported["markov_rank"] == (8 if algorithm == "dspark" else 0)
    assert ("markov_head_type" in exported) is (algorithm == "dspark")
    assert ("confidence_head_with_markov" in exported) is (algorithm == "dspark")

    D, nKV, nH, inter = 32, 1, 4, 128
    layer = {"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
             "pre_feedforward_layernorm.weight": (H,), "post_feedforward_layernorm.weight": (H,),
             "layer_scalar": (1,), "self_attn.q_proj.weight": (nH * D, H), "self_attn.k_proj.weight": (nKV * D, H),
             "self_attn.o_proj.weight": (H, nH * D), "self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,),
             "mlp.gate_proj.weight": (inter, H), "mlp.up_proj.weight": (inter, H), "mlp.down_proj.weight": (H, inter)}
    expected = {"embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "fc.weight": (H, 3 * H),
                "hidden_norm.weight": (H,), "norm.weight": (H,),
                **{f"layers.{i}.{k}": s for i in range(2) for k, s in layer.items()}}
    if algorithm == "dspark":
        expected.update({"markov_head.markov_w1.weight": (V, 8), "markov_head.markov_w2.weight": (V, 8),
                         "markov_head.joint_proj.weight": (24, 8 * 2 + H), "markov_head.joint_proj.bias": (24,),
                         "confidence_head.proj.weight": (1, H + 8), "confidence_head.proj.bias": (1,)})
    assert {k: tuple(t.shape) for k, t in tensors.items()} == expected  # no v_proj (K = V), no v_norm, no prefix
    assert torch.equal(tensors["layers.0.layer_scalar"], torch.ones(1))

    loaded = load_drafter(out)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids_BT": torch.randint(0, V, (2, 16), generator=g),
             "features_BTLH": torch.randn(2, 16, 3, H, generator=g)}
    anchors = torch.tensor([[3, 9], [5, 8]])
    logits = drafter.teacher_forced_logits(batch, anchors)
    torch.testing.assert_close(loaded.teacher_forced_logits(batch, anchors), logits)
    # The draft logits are softcapped (before the Markov bias, which is off for DFlash).
    if algorithm == "dflash":
        assert logits.abs().max() <= 30.0
