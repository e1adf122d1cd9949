"""Speculative decoding against a tiny random target: greedy parity with plain decoding (test doubles of the
drafter interface from ``eval_drafters`` and an untrained DSpark drafter), tau of an oracle and of a random
drafter, per-prompt seeding, and refused bad input. Losslessness at T > 0 is in ``test_specdec_lossless``.

The target exposes layer id -1 (the embedding output) so the oracle can read token ids back from the features.
"""

from __future__ import annotations

import pytest
import torch
from eval_drafters import FixedDistributionDrafter, OracleDrafter, arbitrary_distribution

from dspark.config import TargetConfig
from dspark.eval.specdec import evaluate, prompt_seed, speculative_generate, target_generate, verify_drafts
from dspark.targets import load_target

PROMPTS = [[1, 504, 2683, 314, 253], [1, 9690, 28, 44], [1, 17, 2000, 31, 7, 900, 12]]


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[-1, 0, 2]))


@pytest.fixture(scope="module")
def random_drafter(target):
    vocab = target.embed_weight.shape[0]
    support = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:500].tolist()
    return FixedDistributionDrafter(arbitrary_distribution(vocab, support, seed=2), block_size=4)


@pytest.mark.parametrize("drafter_kind", ["oracle", "oracle_corrupted", "random"])
def test_greedy_speculative_decoding_equals_target_decoding(target, random_drafter, drafter_kind):
    drafter = {"oracle": OracleDrafter(target, 4), "oracle_corrupted": OracleDrafter(target, 4, corrupt_prob=0.3),
               "random": random_drafter}[drafter_kind]
    for prompt in PROMPTS:
        reference = target_generate(target, prompt, max_new_tokens=21, temperature=0.0)
        result = speculative_generate(target, drafter, prompt, max_new_tokens=21, temperature=0.0)
        assert result.tokens == reference
        # Every token after the prefill's comes from a round: accepted drafts plus the target's own token,
        # except that the last round may fill the budget with drafts alone.
        assert len(result.tokens) == 21 and sum(a + 1 for a in result.accepted) - 20 in (0, 1)
        assert all(p <= 4 for p in result.proposed)

        # A stop token ends the sequence (kept, nothing after it) exactly where plain decoding stops.
        stop = reference[9]
        stopped_reference = target_generate(target, prompt, max_new_tokens=21, temperature=0.0, stop_ids=[stop])
        stopped = speculative_generate(target, drafter, prompt, max_new_tokens=21, temperature=0.0, stop_ids=[stop])
        assert stopped.tokens == stopped_reference == reference[: reference.index(stop) + 1]
    if drafter_kind == "oracle_corrupted":  # partial acceptance (and so the cache rollback) was exercised
        assert any(0 < a < p for a, p in zip(result.accepted, result.proposed))


def test_oracle_accepts_every_full_round_and_random_drafter_almost_none(target, random_drafter):
    oracle = evaluate(target, OracleDrafter(target, 4), PROMPTS, max_new_tokens=20, temperature=0.0, seed=0)
    # Prefill token, three rounds of 4 accepted + 1 bonus, then a round whose 4 drafts fill the budget (no bonus).
    result = speculative_generate(target, OracleDrafter(target, 4), PROMPTS[0], max_new_tokens=20, temperature=0.0)
    assert (result.accepted, result.proposed) == ([4, 4, 4, 4], [4, 4, 4, 4])
    assert oracle.acceptance_K == [1.0] * 4 and oracle.survival_K == [1.0] * 4
    assert oracle.tau == 5.0 and oracle.num_rounds == 12 and oracle.generated_tokens == 60

    # Sampling from the target's own distribution (p_draft = p_target) is never rejected either.
    sampled = evaluate(target, OracleDrafter(target, 4), PROMPTS, max_new_tokens=20, temperature=1.0, seed=0)
    assert sampled.acceptance_K == [1.0] * 4

    report = evaluate(target, random_drafter, PROMPTS, max_new_tokens=20, temperature=0.0, seed=0)
    assert report.num_rounds == report.generated_tokens - len(PROMPTS)  # one token per round
    assert 1.0 <= report.tau < 1.05
    assert report.mean_proposal_len > 3.5 and report.acceptance_K[0] < 0.05


def test_evaluate_seeds_each_prompt_independently(target, random_drafter):
    kwargs = dict(max_new_tokens=12, temperature=1.0, stop_ids=[])
    both = evaluate(target, random_drafter, PROMPTS[:2], seed=5, **kwargs)
    again = evaluate(target, random_drafter, PROMPTS[:2], seed=5, **kwargs)
    assert {k: v for k, v in both.to_dict().items() if k not in ("wall_s", "tokens_per_s")} == \
        {k: v for k, v in again.to_dict().items() if k not in ("wall_s", "tokens_per_s")}
    # Each prompt run alone with the generator evaluate derives for its index reproduces its share.
    first = speculative_generate(target, random_drafter, PROMPTS[0], generator=torch.Generator().manual_seed(
        prompt_seed(5, 0)), **kwargs)
    second = speculative_generate(target, random_drafter, PROMPTS[1], generator=torch.Generator().manual_seed(
        prompt_seed(5, 1)), **kwargs)
    assert both.num_rounds == len(first.accepted) + len(second.accepted)
    assert both.generated_tokens == len(first.tokens) + len(second.tokens)
    assert first.confidences == [[0.5] * p for p in first.proposed]
    assert prompt_seed(5, 0) != prompt_seed(5, 1) != prompt_seed(6, 1)


def test_bad_requests_are_refused(target, random_drafter):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        speculative_generate(target, random_drafter, PROMPTS[0], max_new_tokens=0, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        target_generate(target, PROMPTS[0], max_new_tokens=4, temperature=-1.0)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        speculative_generate(target, random_drafter, [], max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate(target, random_drafter, [], max_new_tokens=4, temperature=0.0, seed=0)
    short = FixedDistributionDrafter(arbitrary_distribution(100, [1, 2, 3], seed=0), 2)  # a 100-token vocabulary
    with pytest.raises(ValueError, match=r"probs_KV has shape \(2, 100\), expected \(2, 49152\)"):
        speculative_generate(target, short, PROMPTS[0], max_new_tokens=4, temperature=1.0)


def test_verify_drafts_greedy_accepts_the_argmax_prefix():
    logits_NV = torch.nn.functional.one_hot(torch.tensor([2, 0, 5]), 6).float()  # target argmax: 2, 0, then 5
    assert verify_drafts(logits_NV, torch.tensor([2, 1]), None, temperature=0.0) == (1, 0)
    assert verify_drafts(logits_NV, torch.tensor([3, 0]), None, temperature=0.0) == (0, 2)
    assert verify_drafts(logits_NV, torch.tensor([2, 0]), None, temperature=0.0) == (2, 5)


def test_untrained_dspark_drafter_is_lossless_under_greedy_decoding(tiny_llama_dir):
    drafters = pytest.importorskip("dspark.drafters")
    if not hasattr(drafters, "build_drafter"):
        pytest.skip("dspark.drafters.build_drafter is not available yet")
    from dspark.config import DrafterConfig, DSparkConfig

    target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 2]))
    torch.manual_seed(0)
    drafter = drafters.build_drafter(DrafterConfig(block_size=4, dspark=DSparkConfig(markov_rank=16)),
                                     target.config, target.layer_ids, target.embed_weight, target.lm_head_weight).eval()
    for prompt in PROMPTS[:2]:
        result = speculative_generate(target, drafter, prompt, max_new_tokens=16, temperature=0.0)
        assert result.tokens == target_generate(target, prompt, max_new_tokens=16, temperature=0.0)
        assert max(result.proposed) == 4 and len(result.confidences) == len(result.accepted)
    report = evaluate(target, drafter, PROMPTS, max_new_tokens=12, temperature=1.0, seed=0)
    assert report.generated_tokens == 36 and len(report.acceptance_K) == 4
    # a round emits its accepted drafts plus one target token: never more than its proposal plus one
    assert report.tau <= 1 + report.mean_proposal_len and report.num_rounds >= 36 / (4 + 1)
