"""Rejection sampling is lossless: every token a round emits follows the target's distribution (a high-power
check of ``verify_drafts`` on a 6-token vocabulary), and at T = 1 the first tokens of speculative decoding on the
tiny target follow its exact distribution (chi-square goodness of fit, fixed seeds), while a drafter misreporting
its distribution fails the same test."""

from __future__ import annotations

import pytest
import torch
from eval_drafters import FixedDistributionDrafter, PackedCost, arbitrary_distribution, hashed_confidence

from dspark.config import TargetConfig
from dspark.eval.scheduler import SPSTable
from dspark.eval.specdec import (
    prompt_seed,
    speculative_generate,
    speculative_generate_batch,
    target_generate,
    verify_drafts,
)
from dspark.targets import load_target

PROMPT = [1, 9690, 28, 44]
NUM_NEW = 3  # tokens per run: the prefill's, then drafted slots (3 drafts cut to the budget of 2)
NUM_RUNS = 400

pytestmark = pytest.mark.usefixtures("one_thread")  # a few thousand tiny forwards: threads only add overhead


def _chi2_pvalue(statistic: float, dof: int) -> float:
    # chi-square survival function = regularised upper incomplete gamma Q(dof/2, x/2).
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def _pvalue(observed: list[int], probs: torch.Tensor) -> float:
    n = sum(observed)
    statistic = sum((o - n * float(p)) ** 2 / (n * float(p)) for o, p in zip(observed, probs))
    return _chi2_pvalue(statistic, len(observed) - 1)


def test_every_emitted_position_follows_its_target_row():
    # K = 2 drafts, N = 3 target rows (row 2 = bonus), all different, and drafts from other distributions.
    temperature = 0.7
    logits_NV = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
                              [0.05, 0.05, 0.10, 0.20, 0.30, 0.30],
                              [0.10, 0.30, 0.05, 0.25, 0.05, 0.25]]).log() * temperature
    draft_probs_KV = torch.tensor([[0.10, 0.50, 0.10, 0.10, 0.10, 0.10],
                                   [0.30, 0.05, 0.05, 0.05, 0.25, 0.30]])
    generator = torch.Generator().manual_seed(0)
    counts_NV = torch.zeros(3, 6, dtype=torch.long)  # emitted token counts per position of the round
    accepted = []
    for _ in range(20000):
        drafts_K = torch.multinomial(draft_probs_KV, 1, generator=generator).flatten()
        num_accepted, token = verify_drafts(logits_NV, drafts_K, draft_probs_KV, temperature=temperature,
                                            generator=generator)
        for position, t in enumerate(drafts_K[:num_accepted].tolist() + [token]):
            counts_NV[position, t] += 1
        accepted.append(num_accepted)
    # Position j is reached only if drafts 1..j passed, which never depends on what is drawn at j: so among
    # rounds reaching j the emitted token follows target row j exactly.
    p_target_NV = torch.softmax(logits_NV / temperature, dim=-1)
    for position in range(3):
        assert _pvalue(counts_NV[position].tolist(), p_target_NV[position]) > 1e-3, position
    assert {0, 1, 2} <= set(accepted) and counts_NV[2].sum() > 2000  # every path, the bonus included


def _exact_sequence_probs(target, min_prob: float = 1e-3) -> dict[tuple[int, ...], float]:
    """P(first NUM_NEW tokens) under the target at T = 1, enumerating every branch above ``min_prob``."""
    frontier = [((), 1.0)]
    for _ in range(NUM_NEW):
        grown = []
        for prefix, prob in frontier:
            logits_NV, _ = target.decode_session().extend(torch.tensor(PROMPT + list(prefix)))
            p_V = torch.softmax(logits_NV[-1], dim=-1)
            likely = (p_V * prob > min_prob).nonzero().flatten().tolist()
            grown += [(prefix + (t,), prob * float(p_V[t])) for t in likely]
        frontier = grown
    return dict(frontier)


def _chi_square_pvalue(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> float:
    """p-value of the samples against the exact distribution; cells expected < 5 times are pooled."""
    n = len(samples)
    cells = [seq for seq, p in exact.items() if p * n >= 5]
    assert len(cells) >= 6, "too few cells for a meaningful test"
    observed = [sum(s == seq for s in samples) for seq in cells]
    expected = [exact[seq] * n for seq in cells]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return _chi2_pvalue(statistic, len(observed) - 1)


@pytest.fixture(scope="module")
def sharp_target(tiny_llama_dir):
    """The tiny target with its LM head scaled x40 (untied from the embedding): random weights give a nearly
    uniform distribution over 49k tokens, far too flat for a test with a few hundred samples."""
    sharp = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 2]))
    sharp.model.lm_head.weight = torch.nn.Parameter(sharp.model.lm_head.weight.detach() * 40, requires_grad=False)
    return sharp


@pytest.fixture(scope="module")
def exact(sharp_target):
    return _exact_sequence_probs(sharp_target)


def _drafter(exact, vocab: int, block_size: int, misreport: bool = False, **kwargs) -> FixedDistributionDrafter:
    """Repeats the previous token half the time (this random target likes repeats), else draws from arbitrary
    weights over the likely tokens plus junk the target rejects: close to the target, never equal."""
    support = sorted({t for seq, p in exact.items() if p > 1e-3 for t in seq}) + [5, 600, 7000, 30000]
    return FixedDistributionDrafter(arbitrary_distribution(vocab, support, seed=3), block_size, repeat_prob=0.5,
                                    misreport=misreport, **kwargs)


def _sample_runs(generate) -> list[tuple[int, ...]]:
    return [tuple(generate(torch.Generator().manual_seed(prompt_seed(0, i)))) for i in range(NUM_RUNS)]


@pytest.mark.parametrize("block_size", [1, 3])  # 1: accepted drafts get a bonus token; 3: chains of 2 drafts
def test_speculative_sampling_matches_the_target_distribution(sharp_target, exact, block_size):
    vocab = sharp_target.embed_weight.shape[0]
    drafter = _drafter(exact, vocab, block_size)
    results = [speculative_generate(sharp_target, drafter, PROMPT, max_new_tokens=NUM_NEW, temperature=1.0,
                                    generator=torch.Generator().manual_seed(prompt_seed(0, i)))
               for i in range(NUM_RUNS)]
    samples = [tuple(r.tokens) for r in results]
    rate = sum(sum(r.accepted) for r in results) / sum(sum(r.proposed) for r in results)
    assert 0.2 < rate < 0.8  # both the accept and the resample path are well exercised
    if block_size == 3:
        assert any(r.proposed[0] == 2 and r.accepted[0] == 2 for r in results)
    assert _chi_square_pvalue(samples, exact) > 1e-3


def test_chi_square_harness_accepts_plain_sampling_and_catches_a_biased_drafter(sharp_target, exact):
    plain = _sample_runs(lambda g: target_generate(sharp_target, PROMPT, max_new_tokens=NUM_NEW, temperature=1.0,
                                                   generator=g))
    assert _chi_square_pvalue(plain, exact) > 1e-3
    # Claims its draws came from the arbitrary weights alone: the acceptance ratio is wrong, so is the output.
    liar = _drafter(exact, sharp_target.embed_weight.shape[0], 1, misreport=True)
    biased = _sample_runs(lambda g: speculative_generate(sharp_target, liar, PROMPT, max_new_tokens=NUM_NEW,
                                                         temperature=1.0, generator=g).tokens)
    assert _chi_square_pvalue(biased, exact) < 1e-6


@pytest.mark.parametrize("packed", [True, False])
def test_scheduled_verification_matches_the_target_distribution(sharp_target, exact, packed):
    # Four rows per step; each row's verified prefix is chosen from every row's confidences (which read the token
    # before each slot), falling steps/s making the choice vary: 0, 1 or 2 of the 2 drafts the budget allows. Packed:
    # Algorithm 1's per-row prefixes; padded (the batched session as it is): one common prefix per step.
    # (scheduler_async differs only in its capacity, taken from earlier steps.)
    vocab = sharp_target.embed_weight.shape[0]
    drafter = _drafter(exact, vocab, 3, confidence_of=hashed_confidence)
    # Padded, a step costs R x (1 + m): a steeper table at 8 and 12 tokens keeps m = 0, 1 and 2 all in play.
    sps = SPSTable({1: 100.0, 4: 100.0, 8: 75.0, 16: 40.0} if packed else {1: 100.0, 4: 100.0, 8: 66.0, 12: 52.0})
    results = speculative_generate_batch(
        PackedCost(sharp_target) if packed else sharp_target, drafter, [PROMPT] * NUM_RUNS, max_new_tokens=NUM_NEW,
        temperature=1.0,
        generators=[torch.Generator().manual_seed(prompt_seed(0, i)) for i in range(NUM_RUNS)], batch_size=4,
        verify_policy="scheduler", sps=sps)
    proposed = [p for r in results for p in r.proposed]
    assert {0, 1, 2} <= set(proposed)
    assert sum(sum(r.accepted) for r in results) > 0.2 * sum(proposed)
    assert _chi_square_pvalue([tuple(r.tokens) for r in results], exact) > 1e-3
