"""DeepSeek-V4's DSpark drafter (dspark_v4): a stage equals transformers' V4 decoder layer on the same weights, the
decode path equals the training path, training moves every trained weight and the selection biases, bad input is
refused in one line."""

from __future__ import annotations

import pytest
import torch
from tiny_v4 import V, features, make_drafter, v4_config

from dspark.config import DrafterConfig, DSparkConfig
from dspark.drafters import build_drafter


def test_stage_equals_transformers_v4_decoder_layer(one_thread):
    """A block of one token with the W context rows before it is V4's causal sliding-window layer (window W + 1,
    the query itself included) at that position: HC, window attention with sink and grouped output, and the MoE
    agree with ``DeepseekV4DecoderLayer`` on the same weights."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4DecoderLayer

    from dspark.drafters.v4.layers import DraftStage, gather_windows, rope_cos_sin

    W, S = 5, 12
    config = v4_config(sliding_window=W + 1)
    torch.manual_seed(0)
    layer = DeepseekV4DecoderLayer(config, 0).float()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
        layer.mlp.gate.e_score_correction_bias.normal_(std=0.1)
    stage = DraftStage(config)
    stage.load_state_dict(layer.state_dict(), strict=True)
    x_1SCH = torch.randn(1, S, 2, 64)
    pos_1S = torch.arange(S).unsqueeze(0)
    cos_sin = rope_cos_sin(config, pos_1S, torch.float32)
    q, k = torch.arange(S).view(S, 1), torch.arange(S).view(1, S)
    mask = torch.where((k <= q) & (k > q - (W + 1)), 0.0, float("-inf")).view(1, 1, S, S)
    with torch.no_grad():
        want = layer(x_1SCH, position_embeddings={"main": cos_sin, "compress": cos_sin}, position_ids=pos_1S,
                     attention_mask=mask)
        # The context rows are the layer's own K/V of the earlier positions.
        _, _, collapsed = stage.attn_hc(x_1SCH)
        kv_1SD = stage.self_attn.context_kv(stage.input_layernorm(collapsed), cos_sin)
        ctx_MWD, valid_MW = gather_windows(kv_1SD, torch.arange(S).unsqueeze(0), W)
        got = stage(x_1SCH[0].unsqueeze(1), ctx_MWD, valid_MW, tuple(t[0].unsqueeze(1) for t in cos_sin))
    assert valid_MW.sum(1).tolist() == [min(i, W) for i in range(S)]
    torch.testing.assert_close(got[:, 0], want[0], rtol=1e-5, atol=1e-5)


def test_proposal_equals_teacher_forced_training_path(one_thread):
    """propose_batch (only the last W context rows, rows of different lengths, the Markov head sampling slot by
    slot) gives the distributions the training path computes for the same block, previous tokens = the sampled
    ones; one context is shorter than the window, one much longer."""
    drafter = make_drafter().eval()
    batch = features(2, 40)
    anchors = [5, 31]
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    proposals = drafter.propose_batch([batch["features_BTLH"][b, :a] for b, a in enumerate(anchors)],
                                      [int(batch["input_ids_BT"][b, a]) for b, a in enumerate(anchors)],
                                      temperature=1.0, generators=gens)
    for b, (a, prop) in enumerate(zip(anchors, proposals)):
        ids = batch["input_ids_BT"][b : b + 1].clone()
        ids[0, a + 1 : a + 6] = prop.tokens_K
        row = {**{k: v[b : b + 1] for k, v in batch.items()}, "input_ids_BT": ids}
        with torch.no_grad():
            logits = drafter.teacher_forced_logits(row, torch.tensor([[a]]))[0, 0]
        torch.testing.assert_close(prop.probs_KV, logits.softmax(-1), rtol=1e-5, atol=1e-6)
        assert prop.confidence_K.shape == (5,)


def test_training_moves_every_trained_weight_and_balances_experts(one_thread):
    drafter = make_drafter(v4={"moe_bias_update_rate": 0.01}).train()
    bias_before = [s.mlp.gate.e_score_correction_bias.clone() for s in drafter.stages]
    out = drafter.forward_loss(features(2, 24), torch.Generator().manual_seed(0))
    out.numerator.backward()
    assert set(out.terms) == {"ce", "l1", "bce"} and out.num_tokens > 0
    no_grad = [n for n, p in drafter.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    trained = {n for n, _ in drafter.named_parameters()}
    assert not any(n.startswith(("embed_tokens", "lm_head")) for n in trained)  # frozen target matrices
    # Aux-loss-free balancing: experts above the mean load lose selection bias, those below gain it.
    for stage, before in zip(drafter.stages, bias_before):
        step = stage.mlp.gate.e_score_correction_bias - before
        assert step.abs().max() > 0
        assert set(step.sign().tolist()) <= {-1.0, 0.0, 1.0}
    # Evaluation does not move them.
    drafter.eval()
    frozen = [s.mlp.gate.e_score_correction_bias.clone() for s in drafter.stages]
    with torch.no_grad():
        drafter.forward_loss(features(2, 24), torch.Generator().manual_seed(0))
    assert all(torch.equal(s.mlp.gate.e_score_correction_bias, f) for s, f in zip(drafter.stages, frozen))


def _sharp_target_batch(scale: float):
    """A batch whose target is peaked at the next token: ``final[t] = scale * lm_head[ids[t + 1]]``."""
    batch = features(2, 48, seed=3)
    drafter = make_drafter()
    next_BT = torch.roll(batch["input_ids_BT"], -1, dims=1)
    batch["final_BTH"] = scale * drafter.lm_head.weight[next_BT]
    return batch


def _agreement(drafter, batch, anchor_pos_BA) -> tuple[float, int]:
    """Teacher-forced share of draft slots whose argmax is the target's argmax, and how many distinct tokens the
    draft predicts."""
    with torch.no_grad():
        draft_BAKV = drafter.teacher_forced_logits(batch, anchor_pos_BA)
        target_BTV = batch["final_BTH"] @ drafter.lm_head.weight.T
    K = draft_BAKV.shape[2]
    pos_BAK = anchor_pos_BA.unsqueeze(-1) + torch.arange(K)
    target_BAK = target_BTV.argmax(-1).gather(1, pos_BAK.flatten(1)).view(pos_BAK.shape)
    draft_BAK = draft_BAKV.argmax(-1)
    return (draft_BAK == target_BAK).float().mean().item(), draft_BAK.unique().numel()


def test_training_fits_a_peaked_target_instead_of_collapsing(one_thread):
    """The DSpark loss drives the teacher-forced draft towards the target's argmax on every slot, with as many
    distinct tokens as the target predicts (a collapse to one token, seen once on a near-uniform tiny target, fails
    this). Overfits one batch of a target peaked at the next token."""
    batch = _sharp_target_batch(scale=4.0)
    drafter = make_drafter(v4={"moe_bias_update_rate": 0.01}).train()
    anchors_BA = torch.tensor([[3, 11, 19, 27, 35], [5, 13, 21, 29, 37]])
    before, _ = _agreement(drafter, batch, anchors_BA)
    optimizer = torch.optim.Adam(drafter.trainable_parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):
        out = drafter.forward_loss(batch, generator)
        optimizer.zero_grad()
        (out.numerator / out.weight_sum).backward()
        optimizer.step()
    after, distinct = _agreement(drafter, batch, anchors_BA)
    assert before < 0.15, before
    assert after > 0.8, after
    assert distinct >= 30  # 50 slots over 256 tokens: the draft spreads over the targets' tokens


def test_selection_bias_step_follows_expert_load(one_thread):
    """The bias step is -rate * sign(load - mean load), with the load summed by the hook set from outside."""
    drafter = make_drafter(v4={"moe_bias_update_rate": 0.5})
    stage = drafter.stages[0]
    stage.mlp.expert_counts_E = torch.tensor([6.0, 1.0, 3.0, 2.0])
    seen = []
    drafter.reduce_expert_counts = lambda c: seen.append(c.clone()) or c * 2  # mean 6: loads 12, 2, 6, 4
    before = stage.mlp.gate.e_score_correction_bias.clone()
    drafter.update_selection_bias()
    assert len(seen) == 1
    torch.testing.assert_close(stage.mlp.gate.e_score_correction_bias - before, torch.tensor([-0.5, 0.5, 0.0, 0.5]))


def test_bad_input_is_refused_in_one_line():
    from transformers import AutoConfig

    qwen = AutoConfig.for_model("qwen3", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                num_hidden_layers=3, vocab_size=V, intermediate_size=128)
    # One line each (``.`` stops at a newline, ``$`` anchors the end).
    with pytest.raises(ValueError, match=r"^drafter.algorithm dspark_v4 needs a DeepSeek-V4 target \(model_type "
                                         r"deepseek_v4\), got model_type 'qwen3'; use algorithm dspark for other "
                                         r"targets$"):
        make_drafter(qwen)
    cfg = DrafterConfig(algorithm="dspark_v4", num_layers=3, block_size=5, dspark=DSparkConfig(markov_rank=16))
    with pytest.raises(ValueError, match=r"^dspark_v4 target layer ids \[0, 1, 4\] must lie in 0..3 \(the target has "
                                         r"4 decoder layers\)$"):
        build_drafter(cfg, v4_config(), [0, 1, 4], torch.randn(V, 64), torch.randn(V, 64))
