"""Losslessness with a real DSpark drafter (Markov head and confidence head, random init, so its distribution is
not the target's): at T = 1 the first tokens of batched speculative decoding follow the target's exact
distribution (chi-square goodness of fit, fixed seeds), and the same drafter misreporting its probabilities
fails the test. The target is a tiny random llama with a 32-token vocabulary, so the exact joint distribution of
the first three tokens can be enumerated (32^2 prefixes in one forward)."""

from __future__ import annotations

import pytest
import torch
from test_specdec_lossless import _chi2_pvalue

from dspark.config import DrafterConfig, DSparkConfig
from dspark.drafters.base import Drafter, Proposal
from dspark.eval.specdec import prompt_seed, speculative_generate_batch, target_generate
from dspark.targets.hf import HFTarget

PROMPT = [1, 7, 19, 4, 22]
NUM_NEW = 3  # the prefill's token, then one round of up to 2 drafts (block size 3, cut to the budget)
NUM_RUNS = 600
VOCAB = 32


@pytest.fixture(scope="module")
def setup(one_thread):
    from transformers import AutoConfig, AutoModelForCausalLM

    from dspark.drafters import build_drafter

    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                               max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    # Random weights give a nearly uniform next-token distribution; a sharper head gives the test power.
    model.lm_head.weight.data *= 15
    target = HFTarget(model, tokenizer=None, layer_ids=[0], name="tiny-llama-v32")
    torch.manual_seed(1)
    cfg = DrafterConfig(block_size=3, dspark=DSparkConfig(markov_rank=8, enable_confidence_head=True))
    drafter = build_drafter(cfg, target.config, target.layer_ids, target.embed_weight, target.lm_head_weight).eval()
    assert drafter.markov_head is not None and drafter.confidence_head is not None
    return target, drafter


def _exact_joint(target) -> torch.Tensor:
    """P(first three new tokens) at T = 1 as a [V, V, V] tensor."""
    model = target.model
    with torch.no_grad():
        p1_V = torch.softmax(model(torch.tensor([PROMPT])).logits[0, -1].double(), dim=-1)
        ids_V1 = torch.tensor([PROMPT] * VOCAB)
        p2_VV = torch.softmax(model(torch.cat([ids_V1, torch.arange(VOCAB)[:, None]], 1)).logits[:, -1].double(), -1)
        pairs_P2 = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))
        ids_PT = torch.cat([torch.tensor([PROMPT] * len(pairs_P2)), pairs_P2], 1)
        p3_PV = torch.softmax(model(ids_PT).logits[:, -1].double(), dim=-1)
    return (p1_V[:, None, None] * p2_VV[:, :, None] * p3_PV.view(VOCAB, VOCAB, VOCAB))


def _pvalue(samples: list[tuple[int, ...]], exact_VVV: torch.Tensor) -> float:
    """Chi-square p-value over the joint cells expected >= 5 times, the rest pooled into one cell."""
    n = len(samples)
    counts_VVV = torch.zeros_like(exact_VVV)
    for seq in samples:
        counts_VVV[seq] += 1
    expected_VVV = exact_VVV * n
    big = expected_VVV >= 5
    assert int(big.sum()) >= 8, "too few cells for a meaningful test"
    observed = counts_VVV[big].tolist() + [n - float(counts_VVV[big].sum())]
    expected = expected_VVV[big].tolist() + [n - float(expected_VVV[big].sum())]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return _chi2_pvalue(statistic, len(observed) - 1)


class Misreporting(Drafter):
    """The same drafter claiming its draws came from a flatter distribution: wrong acceptance ratios."""

    algorithm = "misreporting"

    def __init__(self, drafter):
        super().__init__()
        self.drafter = drafter

    def forward_loss(self, batch, generator=None):
        raise NotImplementedError("test double: decoding only")

    def propose(self, context_TLH, anchor_id, *, temperature, generator=None) -> Proposal:
        p = self.drafter.propose(context_TLH, anchor_id, temperature=temperature, generator=generator)
        return Proposal(tokens_K=p.tokens_K, probs_KV=0.3 * p.probs_KV + 0.7 / VOCAB, confidence_K=p.confidence_K)


def _sample(target, drafter):
    generators = [torch.Generator().manual_seed(prompt_seed(0, i)) for i in range(NUM_RUNS)]
    return speculative_generate_batch(target, drafter, [PROMPT] * NUM_RUNS, max_new_tokens=NUM_NEW,
                                      temperature=1.0, generators=generators, batch_size=32)


def test_dspark_drafter_speculative_sampling_matches_the_target(setup):
    target, drafter = setup
    exact_VVV = _exact_joint(target)
    assert float(exact_VVV.sum()) == pytest.approx(1.0)
    results = _sample(target, drafter)
    accepted = sum(sum(r.accepted) for r in results)
    proposed = sum(sum(r.proposed) for r in results)
    assert 0.1 < accepted / proposed < 0.85  # both the accept and the resample path are exercised (~0.17)
    assert any(r.accepted == [2] for r in results) and all(len(r.confidences) == len(r.accepted) for r in results)
    assert _pvalue([tuple(r.tokens) for r in results], exact_VVV) > 1e-3

    # The harness itself: plain sampling from the target passes, the misreporting drafter fails.
    plain = [tuple(target_generate(target, PROMPT, max_new_tokens=NUM_NEW, temperature=1.0,
                                   generator=torch.Generator().manual_seed(prompt_seed(0, i))))
             for i in range(NUM_RUNS)]
    assert _pvalue(plain, exact_VVV) > 1e-3
    biased = _sample(target, Misreporting(drafter))
    assert _pvalue([tuple(r.tokens) for r in biased], exact_VVV) < 1e-6


class ProposalLengths:
    """``drafter`` recording the length of every proposal it returns (a stopped draft is shorter)."""

    def __init__(self, drafter):
        self.drafter, self.lengths = drafter, []

    def __getattr__(self, name):
        return getattr(self.drafter, name)

    def propose_batch(self, *args, **kwargs):
        proposals = self.drafter.propose_batch(*args, **kwargs)
        self.lengths += [p.tokens_K.numel() for p in proposals]
        return proposals


def test_drafts_stopped_on_the_confidence_threshold_keep_sampling_exact(setup):
    """Under ``eval.confidence_threshold`` the drafter stops at the first slot whose survival is below it (one row
    per batch, so per row): fewer draws from each row's generator, the same output distribution."""
    target, drafter = setup
    exact_VVV = _exact_joint(target)
    full = _sample(target, drafter)
    survival = sorted(c[0] * c[1] for r in full for c in r.confidences if len(c) == 2)
    threshold = survival[len(survival) // 2]  # the drafter stops at slot 2 about half the time, sometimes at slot 1
    counted = ProposalLengths(drafter)
    generators = [torch.Generator().manual_seed(prompt_seed(0, i)) for i in range(NUM_RUNS)]
    results = speculative_generate_batch(target, counted, [PROMPT] * NUM_RUNS, max_new_tokens=NUM_NEW,
                                         temperature=1.0, generators=generators, batch_size=1,
                                         confidence_threshold=threshold)
    # Stopped at slot 2 (1 draft) and drafted to the budget (2 drafts; slot 3 is past it, so never drafted).
    assert len(counted.lengths) == sum(len(r.proposed) for r in results) and {1, 2} <= set(counted.lengths) <= {0, 1, 2}
    assert _pvalue([tuple(r.tokens) for r in results], exact_VVV) > 1e-3
