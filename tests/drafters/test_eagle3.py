"""Eagle3 drafter: TTT step inputs on a hand-made case, the vectorised loss against a direct loop, frozen weights,
pruned draft vocab maps, the decoding cache, and greedy speculative decoding equal to the target's own."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_drafters import LAYER_IDS, TINY_TARGET, H, V, make_batch

from dspark.config import (
    ConfigError,
    DrafterConfig,
    DSparkConfig,
    Eagle3Config,
    TargetConfig,
    config_from_dict,
)
from dspark.drafters import build_drafter
from dspark.drafters.common import apply_rope
from dspark.drafters.eagle3 import (
    build_draft_vocab,
    count_supervised_tokens,
    draft_to_target_ids,
)
from dspark.drafters.eagle3.layer import ttt_attention

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:draft vocab")]


def eagle3_cfg(*, block_size: int = 4, num_layers: int = 1, **section) -> DrafterConfig:
    """An Eagle3 config; ``section``: fields of ``drafter.eagle3`` (TTT length 3 unless given)."""
    return DrafterConfig(algorithm="eagle3", block_size=block_size, num_layers=num_layers,
                         eagle3=Eagle3Config(**{"ttt_length": 3, **section}))


def make_eagle3(seed: int = 0, embed=None, counts=None, **overrides):
    """An Eagle3 drafter with every trainable tensor random (norm weights near 1) around random frozen weights."""
    torch.manual_seed(seed)
    embed = torch.randn(V, H) if embed is None else embed
    lm_head = torch.randn(V, H) / H**0.5
    drafter = build_drafter(eagle3_cfg(**overrides), TINY_TARGET, LAYER_IDS, embed, lm_head)
    if counts is not None:
        drafter.set_draft_vocab(*build_draft_vocab(counts, drafter.draft_vocab_size))
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return drafter


# -- a direct, unoptimised reference: one chain per (row, step), attention over explicit key lists -----------


def _project(d, hidden_H, token: int, pos: int):
    layer, attn = d.midlayer, d.midlayer.self_attn
    x = torch.cat([layer.input_layernorm(d.embed_tokens.weight[token]), layer.hidden_norm(hidden_H)])
    cos, sin = d.rotary.cos_sin(torch.tensor(pos), x.dtype)
    q = apply_rope(attn.q_proj(x).view(attn.num_heads, attn.head_dim), cos, sin)
    k = apply_rope(attn.k_proj(x).view(attn.num_kv_heads, attn.head_dim), cos, sin)
    return q, k, attn.v_proj(x).view(attn.num_kv_heads, attn.head_dim)


def _layer_out(d, hidden_H, q, keys):
    attn = d.midlayer.self_attn
    per_kv = attn.num_heads // attn.num_kv_heads
    heads = []
    for n in range(attn.num_heads):
        g = n // per_kv
        k_M = torch.stack([k[g] for k, _ in keys])
        v_M = torch.stack([v[g] for _, v in keys])
        heads.append(torch.softmax(k_M @ q[n] / math.sqrt(attn.head_dim), dim=0) @ v_M)
    x = hidden_H + attn.o_proj(torch.cat(heads))
    return x + d.midlayer.mlp(d.midlayer.post_attention_layernorm(x))


def reference_loss(d, batch, full_lm_head):
    ids, mask, feats, final = (batch[k] for k in ("input_ids_BT", "loss_mask_BT", "features_BTLH", "final_BTH"))
    B, T = ids.shape
    S = d.ttt_length
    draft_ids = d.draft_target_ids()
    total, weight_sum = 0.0, 0.0
    accept_S, count_S = torch.zeros(S), torch.zeros(S)
    for b in range(B):
        fused = d.fc(feats[b].reshape(T, -1))
        token = [int(ids[b, u]) if u < T else 0 for u in range(T + S)]
        step0 = [_project(d, fused[u], token[u + 1], u)[1:] for u in range(T)]
        for t in range(T):
            hidden, own = fused[t], []
            for s in range(S):
                q, k, v = _project(d, hidden, token[t + 1 + s], t + s)
                if s > 0:
                    own.append((k, v))
                hidden = _layer_out(d, hidden, q, step0[: t + 1] + own)
                if t + 2 + s >= T or not mask[b, t + 2 + s]:
                    continue
                logp = torch.log_softmax(d.norm(hidden) @ d.lm_head.weight.T, dim=0)
                target_logits = final[b, t + 1 + s] @ full_lm_head.T
                t_full = torch.softmax(target_logits, dim=0)
                t_draft = t_full if draft_ids is None else torch.softmax(target_logits[draft_ids], dim=0)
                in_draft = t_full if draft_ids is None else t_full[draft_ids]
                total = total + 0.8**s * -(t_draft * logp).sum()
                weight_sum += 0.8**s
                accept_S[s] += 1 - 0.5 * ((logp.exp() - in_draft).abs().sum() + (1 - in_draft.sum()))
                count_S[s] += 1
    return total, weight_sum, accept_S, count_S


@pytest.mark.parametrize("pruned", [False, True])
def test_loss_matches_a_direct_loop(pruned):
    counts = torch.arange(V) % 17 if pruned else None
    d = make_eagle3(draft_vocab_size=120 if pruned else 0, counts=counts, ttt_decay=0.8)
    batch = make_batch(T=18)
    out = d.forward_loss(batch)
    out.numerator.backward()
    grads = {n: p.grad.clone() for n, p in d.named_parameters()}
    d.zero_grad()
    ref, ref_weight, ref_accept, ref_count = reference_loss(d, batch, d.target_lm_head.weight)
    ref.backward()
    torch.testing.assert_close(out.numerator, ref, rtol=1e-5, atol=1e-4)
    assert out.weight_sum.item() == pytest.approx(ref_weight) and torch.equal(out.count_K, ref_count)
    assert out.num_tokens == int(ref_count.sum()) and ref_count[-1] > 0
    torch.testing.assert_close(out.accept_sum_K, ref_accept, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.terms["ce"], ref.detach(), rtol=1e-5, atol=1e-4)
    for name, p in d.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_step_inputs_on_a_hand_made_case():
    # Embedding row v = v * ones: the recorded (pre-norm) embedding names the token it embeds.
    embed = torch.arange(V, dtype=torch.float32).unsqueeze(1).repeat(1, H)
    d = make_eagle3(embed=embed, ttt_length=3)
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    batch = {"input_ids_BT": ids, "loss_mask_BT": torch.ones(1, 6, dtype=torch.bool),
             "features_BTLH": torch.randn(1, 6, len(LAYER_IDS), H), "final_BTH": torch.randn(1, 6, H)}
    seen = []
    original = d.midlayer.qkv

    def record(embeds_BTH, hidden_BTH, rope):
        seen.append((embeds_BTH[0, :, 0].long().tolist(), hidden_BTH.detach().clone(), rope[0][0].clone()))
        return original(embeds_BTH, hidden_BTH, rope)

    d.midlayer.qkv = record
    outputs = d.ttt_hidden(batch)
    # Row t, step s embeds x_{t+1+s} (0 past the end) ...
    assert [tokens for tokens, _, _ in seen] == [[11, 12, 13, 14, 15, 0], [12, 13, 14, 15, 0, 0],
                                                 [13, 14, 15, 0, 0, 0]]
    # ... reads fc(features) at step 0 and its own previous output afterwards ...
    torch.testing.assert_close(seen[0][1], d.fuse(batch["features_BTLH"]))
    for s in (1, 2):
        assert torch.equal(seen[s][1], outputs[s - 1].detach())
    # ... at RoPE position t + s.
    for s in range(3):
        cos, _ = d.rotary.cos_sin(torch.arange(6) + s, torch.float32)
        torch.testing.assert_close(seen[s][2], cos)
    # Supervised rows per step: t + 2 + s < 6, i.e. 4, 3, 2 rows predicting x_{t+2+s}.
    assert d.forward_loss(batch).count_K.tolist() == [4.0, 3.0, 2.0]


def test_attention_sees_earlier_rows_at_step_0_and_only_its_own_chain_later():
    d = make_eagle3(ttt_length=3)
    batch = make_batch(T=16)
    base = [h.detach() for h in d.ttt_hidden(batch)]
    later = dict(batch, input_ids_BT=batch["input_ids_BT"].clone(), features_BTLH=batch["features_BTLH"].clone())
    later["features_BTLH"][0, 8:] += 1.0  # rows >= 8 changed
    changed = [h.detach() for h in d.ttt_hidden(later)]
    for s in range(3):  # causal: rows < 8 unchanged at every step
        torch.testing.assert_close(changed[s][0, :8], base[s][0, :8], rtol=0, atol=0)
        assert not torch.allclose(changed[s][0, 8:], base[s][0, 8:])
    # Row t at step s reads tokens x_1 .. x_{t+1+s} only (step-0 rows u <= t embed x_{u+1}, its own chain the
    # rest): changing x_6 leaves exactly the rows t < 5 - s of step s untouched.
    tok = dict(batch, input_ids_BT=batch["input_ids_BT"].clone())
    tok["input_ids_BT"][0, 6] = (tok["input_ids_BT"][0, 6] + 1) % V
    moved = [h.detach() for h in d.ttt_hidden(tok)]
    for s in range(3):
        torch.testing.assert_close(moved[s][0, : 5 - s], base[s][0, : 5 - s], rtol=0, atol=0)
        assert not torch.allclose(moved[s][0, 5 - s], base[s][0, 5 - s])


def test_only_the_draft_layers_train():
    d = make_eagle3(draft_vocab_size=50, counts=torch.arange(V))
    names = {n for n, p in d.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in d.named_parameters()}
    assert all(n.startswith(("fc.", "midlayer.", "norm.")) for n in names)
    assert {"embed_tokens.weight", "lm_head.weight", "target_lm_head.weight"}.isdisjoint(names)
    # Training checkpoints hold what trains plus the vocab maps, never the frozen target matrices.
    assert set(d.state_dict()) == names | {"d2t", "t2d"}
    d.forward_loss(make_batch()).numerator.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())
    assert d.embed_tokens.weight.grad is None and d.lm_head.weight.grad is None


def test_draft_vocab_maps_draft_ids_to_target_ids():
    counts = torch.tensor([5, 0, 9, 9, 1, 7, 0, 3])
    d2t, t2d = build_draft_vocab(counts, 4)
    # Top 4 by count (ties -> lower id): 2, 3 (9 each), 5 (7), 0 (5); draft ids follow ascending target ids.
    assert draft_to_target_ids(d2t).tolist() == [0, 2, 3, 5] and d2t.tolist() == [0, 1, 1, 2]
    assert t2d.tolist() == [True, False, True, True, False, True, False, False]
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_draft_vocab(counts, 9)

    samples = [{"input_ids": [1, 2, 2, 3], "loss_mask": [0, 1, 1, 1]},
               {"input_ids": torch.tensor([3, 7]), "loss_mask": torch.tensor([True, False])}]
    assert count_supervised_tokens(samples, 8).tolist() == [0, 0, 2, 2, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="sample 0"):
        count_supervised_tokens([{"input_ids": [1, 2], "loss_mask": [1]}], 8)

    fitted = make_eagle3(draft_vocab_size=3)
    assert fitted.needs_token_counts and not make_eagle3().needs_token_counts
    fitted.fit_draft_vocab(samples + [{"input_ids": [5, 5, 5, 6], "loss_mask": [1, 1, 1, 1]}])
    assert draft_to_target_ids(fitted.d2t).tolist() == [2, 3, 5]  # counts 2, 2, 3 (6 once, ties -> lower id)

    d = make_eagle3(draft_vocab_size=40, counts=torch.arange(V) % 23 + (torch.arange(V) == 299) * 100)
    ids = draft_to_target_ids(d.d2t)
    assert 299 in ids.tolist() and torch.equal(d.lm_head.weight, d.target_lm_head.weight[ids])
    ctx = torch.randn(9, len(LAYER_IDS), H)
    for temperature in (0.0, 1.0):
        p = d.propose(ctx, 4, temperature=temperature, context_ids_T=torch.arange(9),
                      generator=torch.Generator().manual_seed(0))
        assert bool(d.t2d[p.tokens_K].all()) and p.probs_KV.shape == (4, V)
        assert torch.all(p.probs_KV[:, ~d.t2d] == 0) and torch.allclose(p.probs_KV.sum(-1), torch.ones(4))
        assert torch.all(p.probs_KV[torch.arange(4), p.tokens_K] > 0)
    # Greedy: the proposal is the argmax of the draft head, mapped through d2t.
    first = d.propose(ctx, 4, temperature=0.0, context_ids_T=torch.arange(9)).tokens_K[0]
    d.reset_context_cache()
    ((k0, v0, q, h),) = d._contexts_kv([ctx], [torch.cat([torch.arange(1, 9), torch.tensor([4])])])
    h1 = d.midlayer.finish(h, ttt_attention(q, k0, v0, torch.ones(1, 9, dtype=torch.bool), []))
    assert int(first) == int(ids[(d.norm(h1)[0, 0] @ d.lm_head.weight.T).argmax()])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decoding_cache_matches_cold_proposals(temperature):
    d = make_eagle3().eval()
    ctx = torch.randn(30, len(LAYER_IDS), H, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, V, (30,), generator=torch.Generator().manual_seed(4))
    for step, length in enumerate([8, 12, 12, 20, 6, 30]):  # grows, repeats, restarts shorter
        kwargs = {"temperature": temperature, "context_ids_T": ids[:length]}
        warm = d.propose(ctx[:length], 7, generator=torch.Generator().manual_seed(step), **kwargs)
        d.reset_context_cache()
        cold = d.propose(ctx[:length], 7, generator=torch.Generator().manual_seed(step), **kwargs)
        assert torch.equal(warm.tokens_K, cold.tokens_K)
        torch.testing.assert_close(warm.probs_KV, cold.probs_KV, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="context_ids_T"):
        d.propose(ctx[:5], 7, temperature=0.0)


def test_decoding_step_equals_the_training_step():
    # Teacher-forced TTT output of the last row at step s = the s-th proposal step fed the same tokens.
    d = make_eagle3(ttt_length=3, block_size=3).eval()
    batch = make_batch(T=16)
    T0 = 6  # context rows 0..5 and anchor x_6; row 5 at step s embeds x_{6+s}
    # Feed training the drafter's own greedy proposals as x_7, x_8: both must then pick the same tokens.
    p = d.propose(batch["features_BTLH"][0, :T0], int(batch["input_ids_BT"][0, T0]), temperature=0.0,
                  context_ids_T=batch["input_ids_BT"][0, :T0])
    forced = batch["input_ids_BT"].clone()
    forced[0, T0 + 1 : T0 + 3] = p.tokens_K[:2]
    outputs = d.ttt_hidden(dict(batch, input_ids_BT=forced[:, : T0 + 3],
                                features_BTLH=batch["features_BTLH"][:, : T0 + 3]))
    for s in range(3):
        logits = d.norm(outputs[s][0, T0 - 1]) @ d.lm_head.weight.T
        assert int(logits.argmax()) == int(p.tokens_K[s])


def test_config_and_construction_refuse_what_eagle3_cannot_be():
    base = {"target": {"name_or_path": "x", "layer_ids": [0, 1]}}
    assert config_from_dict({**base, "drafter": {"algorithm": "eagle3"}}).drafter.eagle3.ttt_length == 7
    with pytest.raises(ConfigError, match="num_layers"):
        config_from_dict({**base, "drafter": {"algorithm": "eagle3", "num_layers": 2}})
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        config_from_dict({**base, "drafter": {"algorithm": "eagle3", "eagle3": {"draft_vocab_size": -1}}})
    emb = torch.randn(V, H)
    with pytest.raises(ValueError, match="one decoder layer"):
        build_drafter(eagle3_cfg(num_layers=2), TINY_TARGET, LAYER_IDS, emb, emb)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_drafter(eagle3_cfg(draft_vocab_size=V + 1), TINY_TARGET, LAYER_IDS, emb, emb)
    with pytest.raises(ValueError, match="layer_ids"):
        build_drafter(eagle3_cfg(), TINY_TARGET, [0, 5], emb, emb)
    # DSpark's heads and block layout are not Eagle3's: setting them is refused when the config is built.
    with pytest.raises(ConfigError, match="drafter.dspark.enable_confidence_head is set .* algorithm eagle3 does not"):
        DrafterConfig(algorithm="eagle3", dspark=DSparkConfig(enable_confidence_head=False))
    with pytest.raises(ConfigError, match="drafter.dflash_layout .* algorithm eagle3 has its own"):
        DrafterConfig(algorithm="eagle3", dflash_layout=True)


@pytest.mark.parametrize("draft_vocab_size", [0, 2000])
def test_greedy_speculative_decoding_equals_target_decoding(tiny_llama_dir, draft_vocab_size):
    from dspark.eval.specdec import evaluate, speculative_generate, target_generate
    from dspark.targets import load_target

    target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 2]))
    torch.manual_seed(0)
    drafter = build_drafter(eagle3_cfg(draft_vocab_size=draft_vocab_size), target.config, target.layer_ids,
                            target.embed_weight, target.lm_head_weight).eval()
    prompts = [[1, 504, 2683, 314, 253], [1, 9690, 28, 44]]
    if draft_vocab_size:
        # A draft vocab holding the target's own greedy tokens, so some drafts are accepted.
        counts = torch.zeros(target.embed_weight.shape[0])
        for prompt in prompts:
            counts[torch.tensor(prompt + target_generate(target, prompt, max_new_tokens=20, temperature=0.0))] += 1
        drafter.set_draft_vocab(*build_draft_vocab(counts, draft_vocab_size))
    for prompt in prompts:
        result = speculative_generate(target, drafter, prompt, max_new_tokens=20, temperature=0.0)
        assert result.tokens == target_generate(target, prompt, max_new_tokens=20, temperature=0.0)
        assert max(result.proposed) == 4
    report = evaluate(target, drafter, prompts, max_new_tokens=12, temperature=1.0, seed=0)
    assert report.generated_tokens == 24 and len(report.acceptance_K) == 4


def test_soft_cross_entropy_gradient_is_the_autograd_one():
    from dspark.drafters.eagle3.loss import soft_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, H, generator=g, requires_grad=True)
    lm = torch.randn(V, H, generator=g) / 8
    final = torch.randn(7, H, generator=g)
    coef = torch.rand(7, generator=g)
    ids = torch.tensor([0, 3, 5, 17, 40, 299])
    for draft_ids in (None, ids):
        lm_draft = lm if draft_ids is None else lm[draft_ids]
        loss, _, _ = soft_cross_entropy(h, lm_draft, lm, final, draft_ids, coef, chunk_rows=3)
        (grad,) = torch.autograd.grad(loss, h)
        t = F.softmax(final @ lm.T if draft_ids is None else (final @ lm.T)[:, draft_ids], dim=-1)
        ref = (coef * -(t * F.log_softmax(h @ lm_draft.T, dim=-1)).sum(-1)).sum()
        (ref_grad,) = torch.autograd.grad(ref, h)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
