"""DSpark / DFlash drafter: parity of the vectorised training path with a direct per-block computation.

Legend: T tokens, S block length, K predicted slots, H hidden, V vocab, R Markov rank.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_drafters import LAYER_IDS, TINY_TARGET, H, V, make_batch, make_drafter

from dspark.config import ConfigError, DrafterConfig, DSparkConfig, TargetConfig
from dspark.drafters import build_drafter
from dspark.drafters.anchors import sample_anchors
from dspark.export.deepspec import deepspec_config

EPS = TINY_TARGET["rms_norm_eps"]
THETA = TINY_TARGET["rope_parameters"]["rope_theta"]

pytestmark = pytest.mark.usefixtures("one_thread")


# -- a direct, unoptimised implementation (one block at a time, plain loops) ------------------------------------


def _rms(x, weight):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def _rope(x_SND, pos_S):
    D = x_SND.shape[-1]
    half = D // 2
    angle = pos_S[:, None].double() * THETA ** (-2.0 * torch.arange(half).double() / D)
    cos, sin = angle.cos().float()[:, None], angle.sin().float()[:, None]
    x1, x2 = x_SND[..., :half], x_SND[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_block_hidden(d, feats_TLH, anchor_id, p):
    """Final-normed hidden states of the prediction slots of the block at position p: ``[K, H]``."""
    nh, G, D = TINY_TARGET["num_attention_heads"], TINY_TARGET["num_key_value_heads"], TINY_TARGET["head_dim"]
    ctx_pH = _rms(feats_TLH[:p].reshape(p, -1) @ d.fc.weight.T, d.hidden_norm.weight)
    S = d.block_len
    x = d.embed_tokens.weight[[anchor_id] + [d.mask_token_id] * (S - 1)]
    pos = torch.arange(p + S)
    for layer in d.layers:
        at = layer.self_attn
        hn = _rms(x, layer.input_layernorm.weight)
        kv_in = torch.cat([ctx_pH, hn])  # KV injection: context rows then block rows
        q = _rope(_rms((hn @ at.q_proj.weight.T).view(S, nh, D), at.q_norm.weight), pos[p:])
        k = _rope(_rms((kv_in @ at.k_proj.weight.T).view(p + S, G, D), at.k_norm.weight), pos)
        v = (kv_in @ at.v_proj.weight.T).view(p + S, G, D)
        k, v = k.repeat_interleave(nh // G, dim=1), v.repeat_interleave(nh // G, dim=1)
        att = torch.softmax(torch.einsum("snd,tnd->nst", q, k) / math.sqrt(D), dim=-1)  # no mask at all
        x = x + torch.einsum("nst,tnd->snd", att, v).reshape(S, -1) @ at.o_proj.weight.T
        hn = _rms(x, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        x = x + (F.silu(hn @ mlp.gate_proj.weight.T) * (hn @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    h = _rms(x, d.norm.weight)
    return h[1:] if d.dflash_layout else h


def reference_heads(d, h_KH, prev_K):
    """(logit bias ``[K, V]`` or 0, confidence logits ``[K]`` or None), written from the DESIGN formulas."""
    bias, e_KR, conf = 0.0, None, None
    mh = d.markov_head
    if mh is not None:
        r = mh.rank
        e_KR = mh.markov_w1.weight[prev_K]
        if mh.kind == "vanilla":
            u_KR = e_KR
        elif mh.kind == "gated":
            u_KR = torch.sigmoid(torch.cat([h_KH, e_KR], -1) @ mh.gate_proj.weight.T + mh.gate_proj.bias) * e_KR
        else:
            s, us = torch.zeros(r), []
            for k in range(h_KH.shape[0]):
                y = torch.cat([s, e_KR[k], h_KH[k]]) @ mh.joint_proj.weight.T + mh.joint_proj.bias
                g, c, o = y[:r], y[r : 2 * r], y[2 * r :]
                us.append(torch.tanh(o))
                s = torch.sigmoid(g) * s + (1 - torch.sigmoid(g)) * torch.tanh(c)
            u_KR = torch.stack(us)
        bias = u_KR @ mh.markov_w2.weight.T
    if d.confidence_head is not None:
        x = torch.cat([h_KH, e_KR], -1) if e_KR is not None else h_KH
        conf = (x @ d.confidence_head.proj.weight.T + d.confidence_head.proj.bias).squeeze(-1)
    return bias, conf


def reference_loss(d, batch, generator):
    """Numerator, weight sum, terms and per-position acceptance by looping over sequences, anchors and slots."""
    cfg = d.cfg
    ids, mask, feats, final = (batch[k] for k in ("input_ids_BT", "loss_mask_BT", "features_BTLH", "final_BTH"))
    B, T = ids.shape
    K = d.block_size
    lm = d.lm_head.weight
    anchors, anchor_valid = sample_anchors(mask, cfg.num_anchors, generator)
    num = torch.zeros(())
    terms = {"ce": 0.0, "l1": 0.0, "bce": 0.0}
    wsum, accept, count = 0.0, torch.zeros(K), torch.zeros(K)
    dspark = d.algorithm == "dspark"
    for b in range(B):
        for a in anchors[b][anchor_valid[b]].tolist():
            assert mask[b, a] and mask[b, a + 1]
            n_valid = 0
            while n_valid < K and a + n_valid + 1 < T and mask[b, a + n_valid + 1]:
                n_valid += 1
            labels = [int(ids[b, a + j + 1]) if a + j + 1 < T else 0 for j in range(K)]
            h = reference_block_hidden(d, feats[b], int(ids[b, a]), a)
            bias, conf = reference_heads(d, h, torch.tensor([int(ids[b, a])] + labels[:-1]))
            logits = h @ lm.T + bias
            for j in range(n_valid):
                w = math.exp(-j / cfg.loss_decay)
                ce = F.cross_entropy(logits[j : j + 1], torch.tensor([labels[j]]))
                l1 = (logits[j].softmax(-1) - (final[b, a + j] @ lm.T).softmax(-1)).abs().sum()
                wsum += w
                accept[j] += 1 - 0.5 * l1.item()
                count[j] += 1
                terms["ce"] += w * ce.item()
                if not dspark:
                    num = num + w * ce
                    continue
                terms["l1"] += w * l1.item()
                num = num + w * (cfg.dspark.ce_weight * ce + cfg.dspark.l1_weight * l1)
                if conf is not None:
                    c_star = 1 - 0.5 * l1.detach()
                    c = torch.sigmoid(conf[j])
                    bce = -(c_star * torch.log(c) + (1 - c_star) * torch.log(1 - c))
                    terms["bce"] += w * bce.item()
                    num = num + cfg.dspark.bce_weight * w * bce
    return num, wsum, terms, accept, count


CASES = {
    "vanilla": dict(dspark={"markov_head_type": "vanilla"}),
    "gated": dict(dspark={"markov_head_type": "gated"}),
    "rnn": dict(dspark={"markov_head_type": "rnn"}, block_size=5),
    "no_markov": dict(dspark={"markov_rank": 0}),
    "no_heads": dict(dspark={"markov_rank": 0, "enable_confidence_head": False}),
    "dflash_layout": dict(dflash_layout=True, block_size=4),
    "dflash": dict(algorithm="dflash"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_match_a_direct_per_block_computation(case):
    d = make_drafter(**CASES[case])
    batch = make_batch()
    out = d.forward_loss(batch, torch.Generator().manual_seed(3))
    out.numerator.backward()
    grads = {n: p.grad.clone() for n, p in d.named_parameters()}
    d.zero_grad()
    num, wsum, terms, accept, count = reference_loss(d, batch, torch.Generator().manual_seed(3))
    num.backward()

    torch.testing.assert_close(out.numerator, num, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.weight_sum, torch.tensor(wsum), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.count_K, count)
    torch.testing.assert_close(out.accept_sum_K, accept, rtol=1e-5, atol=1e-5)
    assert out.num_tokens == int(count.sum())
    assert count[0] > count[-1] > 0  # some blocks were cut short (hole, padding, end of sequence)
    for key, value in out.terms.items():
        assert value == pytest.approx(terms[key], rel=1e-5), key
    expected_terms = {"ce"} if d.algorithm == "dflash" else {"ce", "l1"} | ({"bce"} if d.confidence_head else set())
    assert set(out.terms) == expected_terms
    if d.algorithm == "dspark":
        combined = sum(getattr(d.cfg.dspark, f"{k}_weight") * v for k, v in out.terms.items())
        assert out.numerator.item() == pytest.approx(combined.item(), rel=1e-5)
    for name, p in d.named_parameters():
        assert grads[name].abs().max() > 0, name  # every trainable tensor is reached
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_weights_get_no_gradient_and_are_not_checkpointed():
    tiny_batch = make_batch()
    d = make_drafter()
    names = {n for n, _ in d.named_parameters()}
    assert not any(n.startswith(("embed_tokens", "lm_head")) for n in names)
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in d.parameters()}
    embed_before = d.embed_tokens.weight.clone()
    d.forward_loss(tiny_batch, torch.Generator().manual_seed(0)).numerator.backward()
    assert d.embed_tokens.weight.grad is None and d.lm_head.weight.grad is None
    assert torch.equal(d.embed_tokens.weight, embed_before)
    assert "lm_head.weight" not in d.state_dict() and "lm_head.weight" in d.full_state_dict()
    # A fresh drafter's Markov W2 is zero: it starts as the target's own LM head on the draft hidden state.
    fresh = build_drafter(DrafterConfig(), TINY_TARGET, LAYER_IDS, torch.randn(V, H), torch.randn(V, H))
    assert fresh.markov_head.markov_w2.weight.abs().max() == 0


def test_block_sees_only_context_before_its_anchor_and_nothing_of_other_blocks():
    d = make_drafter()
    batch = make_batch()
    anchors = torch.tensor([[4, 13], [5, 9]])  # block 4 (K=7) has labels 5..11: block 13 lies beyond it
    base = d.teacher_forced_logits(batch, anchors)

    def changed(key, b, t):
        pert = {k: v.clone() for k, v in batch.items()}
        pert[key][b, t] = (pert[key][b, t] + 7) % V if key == "input_ids_BT" else pert[key][b, t] + 1.0
        diff = (d.teacher_forced_logits(pert, anchors) - base).abs()
        return [[bool(diff[bb, a].max() > 1e-5) for a in range(2)] for bb in range(2)]

    # Features (context): position 3 precedes both anchors of row 0; 4 (block 4's own anchor) up to 12 are
    # context of block 13 only; 13 itself and later are seen by no block.
    assert changed("features_BTLH", 0, 3) == [[True, True], [False, False]]
    for t in (4, 8, 12):
        assert changed("features_BTLH", 0, t) == [[False, True], [False, False]]
    for t in (13, 15):
        assert changed("features_BTLH", 0, t) == [[False, False], [False, False]]
    # Tokens: the anchor token of block 13 reaches only block 13 (no attention between blocks); a label of
    # block 4 reaches only block 4 (teacher-forced previous token of the next slot); token 22 reaches none.
    assert changed("input_ids_BT", 0, 13) == [[False, True], [False, False]]
    assert changed("input_ids_BT", 0, 7) == [[True, False], [False, False]]
    assert changed("input_ids_BT", 0, 22) == [[False, False], [False, False]]


@pytest.mark.parametrize("case", ["vanilla", "rnn", "gated", "no_markov", "dflash_layout", "dflash"])
def test_propose_equals_teacher_forced_training_logits(case):
    d = make_drafter(**CASES[case])
    batch = make_batch()
    a, K = 10, d.block_size
    feats = batch["features_BTLH"][0]
    prop = d.propose(feats[:a], int(batch["input_ids_BT"][0, a]), temperature=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert prop.tokens_K.shape == (K,) and prop.probs_KV.shape == (K, V)
    # Feed the sampled tokens back as ground truth: training must see exactly the same distributions.
    forced = {k: v.clone() for k, v in batch.items()}
    forced["input_ids_BT"][0, a + 1 : a + 1 + K] = prop.tokens_K
    logits_KV = d.teacher_forced_logits(forced, torch.tensor([[a], [0]]))[0, 0]
    torch.testing.assert_close(prop.probs_KV, logits_KV.softmax(-1), rtol=1e-4, atol=1e-6)
    h = reference_block_hidden(d, feats, int(batch["input_ids_BT"][0, a]), a)
    _, conf = reference_heads(d, h, torch.cat([batch["input_ids_BT"][0, a : a + 1], prop.tokens_K[:-1]]))
    if conf is None:
        assert prop.confidence_K is None
    else:
        torch.testing.assert_close(prop.confidence_K, torch.sigmoid(conf), rtol=1e-4, atol=1e-6)

    greedy = d.propose(feats[:a], int(batch["input_ids_BT"][0, a]), temperature=0.0)
    forced["input_ids_BT"][0, a + 1 : a + 1 + K] = greedy.tokens_K
    logits_KV = d.teacher_forced_logits(forced, torch.tensor([[a], [0]]))[0, 0]
    assert torch.equal(greedy.tokens_K, logits_KV.argmax(-1))
    assert torch.equal(greedy.probs_KV, F.one_hot(greedy.tokens_K, V).float())


def test_propose_with_empty_context_and_bad_temperature():
    d = make_drafter()
    prop = d.propose(torch.zeros(0, len(LAYER_IDS), H), 5, temperature=0.0)
    assert prop.tokens_K.shape == (7,)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        d.propose(torch.zeros(3, len(LAYER_IDS), H), 5, temperature=-1)


def test_rnn_head_with_state_and_hidden_zeroed_is_a_markov_bias():
    torch.manual_seed(0)
    rnn = make_drafter(dspark={"markov_head_type": "rnn"}).markov_head
    r = rnn.rank
    with torch.no_grad():
        rnn.joint_proj.weight[:, :r] = 0  # no state input ...
        rnn.joint_proj.weight[:, 2 * r :] = 0  # ... and no hidden input: u_k depends on x_{k-1} only
    h_XKH = torch.randn(3, 5, H)
    prev_XK = torch.randint(0, V, (3, 5))
    u_rnn, _ = rnn.teacher_forced(h_XKH, prev_XK)
    # A vanilla Markov head whose embedding table is tanh(o-part of joint_proj applied to W1).
    o_weight, o_bias = rnn.joint_proj.weight[2 * r :, r : 2 * r], rnn.joint_proj.bias[2 * r :]
    table = torch.tanh(rnn.markov_w1.weight @ o_weight.T + o_bias)
    torch.testing.assert_close(u_rnn, table[prev_XK])
    torch.testing.assert_close(rnn.markov_w2(u_rnn), rnn.markov_w2(table[prev_XK]))


def test_dflash_layout_block_is_the_dspark_block_one_longer_without_its_anchor_output():
    dflash = make_drafter(dflash_layout=True, block_size=4)
    long = make_drafter(block_size=5)
    long.load_state_dict(dflash.state_dict())
    batch = make_batch()
    anchors = torch.tensor([[4, 9], [3, 8]])
    ctx = dflash.fuse_context(batch["features_BTLH"])
    anchor_ids = batch["input_ids_BT"].gather(1, anchors)
    h_dflash = dflash.block_hidden(ctx, anchor_ids, anchors)
    h_long = long.block_hidden(ctx, anchor_ids, anchors)
    assert h_dflash.shape == (2, 2, 4, H)
    torch.testing.assert_close(h_dflash, h_long[:, :, 1:])
    assert deepspec_config(dflash)["block_size"] == 5 and deepspec_config(long)["block_size"] == 5


def test_dflash_algorithm_has_no_heads_and_refuses_the_dspark_section():
    tiny_batch = make_batch()
    with pytest.raises(ConfigError, match=r"^drafter.dspark.markov_rank is set \(64\), but algorithm dflash does not "
                                          r"read the dspark section \(only dspark, dspark_v4\); remove it$"):
        DrafterConfig(algorithm="dflash", dspark=DSparkConfig(markov_rank=64))
    d = build_drafter(DrafterConfig(algorithm="dflash", num_layers=1), TINY_TARGET, LAYER_IDS,
                      torch.randn(V, H), torch.randn(V, H))
    assert d.markov_head is None and d.confidence_head is None
    assert d.propose(tiny_batch["features_BTLH"][0, :5], 1, temperature=1.0).confidence_K is None


def test_anchor_sampling_is_driven_by_the_generator():
    d, tiny_batch = make_drafter(), make_batch()
    a = d.forward_loss(tiny_batch, torch.Generator().manual_seed(5)).numerator
    b = d.forward_loss(tiny_batch, torch.Generator().manual_seed(5)).numerator
    c = d.forward_loss(tiny_batch, torch.Generator().manual_seed(6)).numerator
    assert a.item() == b.item() and a.item() != c.item()


def test_chunking_does_not_change_the_loss():
    tiny_batch = make_batch()
    d = make_drafter()
    out = d.forward_loss(tiny_batch, torch.Generator().manual_seed(0))
    out.numerator.backward()
    grad = d.markov_head.markov_w2.weight.grad.clone()
    d.zero_grad()
    d.loss_chunk_rows = 3
    small = d.forward_loss(tiny_batch, torch.Generator().manual_seed(0))
    small.numerator.backward()
    torch.testing.assert_close(small.numerator, out.numerator)
    torch.testing.assert_close(d.markov_head.markov_w2.weight.grad, grad)


def test_a_batch_without_supervised_pairs_gives_a_zero_loss_that_backpropagates():
    d = make_drafter()
    batch = make_batch()
    batch["loss_mask_BT"][:] = False
    batch["loss_mask_BT"][0, 5] = True  # a lone supervised token is no anchor
    out = d.forward_loss(batch, torch.Generator().manual_seed(0))
    out.numerator.backward()
    assert out.numerator.item() == 0 and out.weight_sum.item() == 0 and out.num_tokens == 0
    assert out.count_K.sum() == 0 and all(p.grad.abs().max() == 0 for p in d.parameters())


def test_bad_inputs_raise_clear_errors():
    tiny_batch = make_batch()
    d = make_drafter()
    with pytest.raises(ValueError, match="training batch lacks final_BTH"):
        d.forward_loss({k: v for k, v in tiny_batch.items() if k != "final_BTH"})
    bad = dict(tiny_batch, features_BTLH=tiny_batch["features_BTLH"][:, :, :2])
    with pytest.raises(ValueError, match=r"features have 2 layers x hidden 64; the drafter expects 3 layers"):
        d.forward_loss(bad)
    emb = torch.randn(V, H)
    with pytest.raises(ValueError, match=r"mask_token_id 300 is outside the vocabulary \[0, 300\)"):
        build_drafter(DrafterConfig(mask_token_id=300), TINY_TARGET, LAYER_IDS, emb, emb)
    with pytest.raises(ValueError, match=r"target LM head has shape \(300, 32\), expected"):
        build_drafter(DrafterConfig(), TINY_TARGET, LAYER_IDS, emb, torch.randn(V, 32))
    with pytest.raises(ValueError, match=r"layer_ids \[0, 5\] must be strictly increasing within -1..4"):
        build_drafter(DrafterConfig(), TINY_TARGET, [0, 5], emb, emb)
    with pytest.raises(ValueError, match="markov_head_type must be one of vanilla, gated, rnn, got 'lstm'"):
        build_drafter(DrafterConfig(dspark=DSparkConfig(markov_head_type="lstm")), TINY_TARGET, LAYER_IDS, emb, emb)
    with pytest.raises(ValueError, match="drafter.algorithm 'eagle9' unknown"):
        build_drafter(DrafterConfig(algorithm="eagle9"), TINY_TARGET, LAYER_IDS, emb, emb)
    assert build_drafter(DrafterConfig(), TINY_TARGET, LAYER_IDS, emb, emb).mask_token_id == V - 1


def test_builds_from_a_real_target_and_trains_on_its_features(tiny_llama_dir):
    from dspark.targets import load_target

    target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 1, 2]))
    d = build_drafter(DrafterConfig(num_layers=1, num_anchors=4, dspark=DSparkConfig(markov_rank=8)), target.config,
                      target.layer_ids, target.embed_weight, target.lm_head_weight)
    assert d.layers[0].self_attn.head_dim == 16 and d.rotary.theta == target.config.rope_parameters["rope_theta"]
    ids = torch.randint(0, 1000, (2, 16))
    feats = target.features(ids)
    batch = {"input_ids_BT": ids, "loss_mask_BT": torch.ones(2, 16, dtype=torch.bool),
             "features_BTLH": feats.layers_BTLH, "final_BTH": feats.final_BTH}
    out = d.forward_loss(batch, torch.Generator().manual_seed(0))
    out.numerator.backward()
    assert out.num_tokens > 0 and torch.isfinite(out.numerator)
    assert all(p.grad is not None for p in d.trainable_parameters())
    assert d.propose(feats.layers_BTLH[0, :8], int(ids[0, 8]), temperature=1.0).probs_KV.shape == (7, d.vocab_size)
