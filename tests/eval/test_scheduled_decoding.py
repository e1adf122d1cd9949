"""Confidence-scheduled verification inside decoding (``eval.verify_policy``): the paper's Appendix A point (the
early stop keeps rejection sampling exact, looking ahead biases it), greedy scheduled decoding equal to the
target's own, ragged prefixes verified in one batched forward equal to one forward per row, and the SPS table of
the current device (a missing one warns once and names the command)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from eval_drafters import OracleDrafter, PackedCost, hashed_confidence

from dspark.config import TargetConfig
from dspark.drafters.base import Proposal
from dspark.eval.policies import default_sps_path, load_device_sps
from dspark.eval.scheduler import SPSTable, schedule_prefixes
from dspark.eval.specdec import DecodeStats, prompt_seed, speculative_generate_batch, target_generate, verify_drafts
from dspark.targets import load_target

PROMPTS = [[1, 504, 2683, 314, 253], [1, 9690, 28, 44], [1, 17, 2000, 31, 7, 900, 12], [1, 5, 6],
           [1, 77, 78, 79, 80, 81, 82, 83, 84], [1, 300, 301, 302, 303]]
# Steps/s falling with the batch: Algorithm 1 admits the likeliest drafts of 4 rows of 4 and stops part way.
SPS = SPSTable({1: 100.0, 4: 100.0, 8: 80.0, 20: 30.0})


def _chi2_pvalue(observed: list[int], probs: list[float]) -> float:
    n = sum(observed)
    statistic = sum((o - n * p) ** 2 / (n * p) for o, p in zip(observed, probs))
    # chi-square survival function = regularised upper incomplete gamma Q(dof/2, x/2).
    return float(torch.special.gammaincc(torch.tensor((len(observed) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def _first_tokens(early_stop: bool, num: int = 3000) -> tuple[list[int], set[int]]:
    """The construction in ``dspark.eval.scheduler``'s docstring: tokens {0, 1}, p_target = (0.5, 0.5) at every
    position, drafts from (0.8, 0.2), c_1 = 0.5 and c_2 = 1 if d_1 = 0 else 0, SPS(1, 2, 3) = (1, 0.6, 0.55). Each
    round the scheduler picks the prefix, ``verify_drafts`` runs the rejection test; returns the counts of the
    first emitted token and the prefix lengths that occurred."""
    generator = torch.Generator().manual_seed(0)
    logits_NV = torch.full((3, 2), 0.5).log()
    draft_probs_KV = torch.tensor([[0.8, 0.2], [0.8, 0.2]])
    sps = SPSTable({1: 1.0, 2: 0.6, 3: 0.55})
    counts, lengths = [0, 0], set()
    drafts_RK = torch.multinomial(draft_probs_KV[0], 2 * num, replacement=True, generator=generator).view(num, 2)
    for drafts_K in drafts_RK:
        confidence = [0.5, 1.0 if int(drafts_K[0]) == 0 else 0.0]
        k = schedule_prefixes([confidence], sps, early_stop=early_stop).prefix_R[0]
        lengths.add(k)
        num_accepted, own = verify_drafts(logits_NV[: k + 1], drafts_K[:k], draft_probs_KV[:k], temperature=1.0,
                                          generator=generator)
        counts[int(drafts_K[0]) if num_accepted > 0 else own] += 1
    return counts, lengths


def test_appendix_a_early_stop_is_exact_and_looking_ahead_is_biased():
    exact, lengths = _first_tokens(early_stop=True)
    assert lengths == {0}  # 1.5 x 0.6 <= 1: the first admission does not pay, nothing after it is looked at
    assert _chi2_pvalue(exact, [0.5, 0.5]) > 1e-3
    biased, lengths = _first_tokens(early_stop=False)
    assert lengths == {0, 2}  # both drafts exactly when d_1 = 0: the choice depends on the draft it verifies
    assert _chi2_pvalue(biased, [0.5, 0.5]) < 1e-6
    assert _chi2_pvalue(biased, [0.6, 0.4]) > 1e-3  # the analytic biased law 0.8 x 0.5/0.8 + 0.2 x 0.5 = 0.6


@pytest.fixture(scope="module")
def target(tiny_llama_dir, one_thread):
    """The tiny target with its LM head scaled x40 (as in test_specdec_lossless): random weights alone give a nearly
    uniform distribution, where a draft at another temperature is never rejected."""
    sharp = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[-1, 0, 2]))
    sharp.model.lm_head.weight = torch.nn.Parameter(sharp.model.lm_head.weight.detach() * 40, requires_grad=False)
    return sharp


class ConfidentOracle(OracleDrafter):
    """The target's own continuation, corrupted at random slots (T = 0; the corruption drawn from the row's
    generator), or drafted at 1.5x the temperature (T > 0), with confidences read off the previous token."""

    def propose(self, context_TLH, anchor_id, *, temperature, generator=None):
        self.corrupt_gen = generator
        proposal = super().propose(context_TLH, anchor_id, temperature=temperature * 1.5, generator=generator)
        previous = [anchor_id] + proposal.tokens_K[:-1].tolist()
        return Proposal(tokens_K=proposal.tokens_K, probs_KV=proposal.probs_KV,
                        confidence_K=torch.tensor([hashed_confidence(t) for t in previous]))


class WithoutBatchSession:
    """The target with no batched decode session: decoding falls back to one forward per row."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        if name == "batch_decode_session":
            raise AttributeError(name)
        return getattr(self._target, name)


def _run(target, drafter, policy: str, temperature: float, stats=None):
    generators = [torch.Generator().manual_seed(prompt_seed(3, i)) for i in range(len(PROMPTS))]
    return speculative_generate_batch(target, drafter, PROMPTS, max_new_tokens=14, temperature=temperature,
                                      generators=generators, batch_size=4, verify_policy=policy, sps=SPS,
                                      stats=stats)


@pytest.mark.parametrize("policy", ["scheduler", "scheduler_async"])
def test_scheduled_greedy_decoding_is_the_targets_own(target, policy):
    # Planned as a packed verifier (Algorithm 1's per-request prefixes); the padded form is tested below.
    drafter, packed = ConfidentOracle(target, 4, corrupt_prob=0.2), PackedCost(target)
    stats = {name: DecodeStats() for name in ("full", policy)}
    full = _run(packed, drafter, "full", 0.0, stats["full"])
    scheduled = _run(packed, drafter, policy, 0.0, stats[policy])
    for prompt, result in zip(PROMPTS, scheduled):
        assert result.tokens == target_generate(target, prompt, max_new_tokens=14, temperature=0.0)
    proposed = [p for r in scheduled for p in r.proposed]
    # Ragged: in one step some rows verify nothing, others a partial or a full block.
    assert 0 in proposed and any(0 < p < 4 for p in proposed) and 4 in proposed
    assert sum(proposed) < sum(p for r in full for p in r.proposed)
    assert stats[policy].fed_tokens < stats["full"].fed_tokens
    assert stats[policy].num_target_calls > 0 and stats[policy].target_s > 0


def test_ragged_prefixes_in_one_forward_equal_one_forward_per_row(target):
    drafter = ConfidentOracle(target, 4, corrupt_prob=0.0)
    batched = _run(PackedCost(target), drafter, "scheduler", 1.0)  # Algorithm 1, as for one forward per row
    per_row = _run(WithoutBatchSession(target), drafter, "scheduler", 1.0)
    assert [(r.tokens, r.accepted, r.proposed) for r in batched] == \
        [(r.tokens, r.accepted, r.proposed) for r in per_row]
    rounds = [(a, p) for r in batched for a, p in zip(r.accepted, r.proposed)]
    # Rows verified prefixes of several lengths; drafts were both accepted and rejected (T = 1).
    assert len({p for _, p in rounds}) >= 3 and any(a > 0 for a, _ in rounds) and any(a < p for a, p in rounds)


def test_a_padding_session_is_planned_with_one_common_prefix_per_step(target, monkeypatch):
    """The batched session runs every row at the longest feed's length, so the scheduler plans the common prefix m
    (``schedule_common_prefix``): each row verifies min(m, its drafts), and the step is priced at R x (1 + m)."""
    from dspark.eval import scheduler

    plans = []
    plan = scheduler.VerifyPlanner.plan

    def recording(self, confidences):
        schedule = plan(self, confidences)
        plans.append((self.padded, confidences, schedule))
        return schedule

    monkeypatch.setattr(scheduler.VerifyPlanner, "plan", recording)
    drafter = ConfidentOracle(target, 4, corrupt_prob=0.2)
    results = _run(target, drafter, "scheduler", 0.0)
    for prompt, result in zip(PROMPTS, results):
        assert result.tokens == target_generate(target, prompt, max_new_tokens=14, temperature=0.0)
    assert plans and all(padded for padded, _, _ in plans)
    for _, confidences, schedule in plans:
        m = max(schedule.prefix_R)
        assert schedule.prefix_R == [min(m, len(c)) for c in confidences]
        assert schedule.batch_tokens == len(confidences) * (1 + m)
    assert len({max(s.prefix_R) for _, _, s in plans}) >= 2  # the common prefix changes from step to step
    # One forward per row costs each row its own feed: Algorithm 1 plans there.
    plans.clear()
    _run(WithoutBatchSession(target), drafter, "scheduler", 0.0)
    assert plans and not any(padded for padded, _, _ in plans)


def test_scheduler_policies_refuse_bad_settings(target):
    drafter = ConfidentOracle(target, 4)
    with pytest.raises(ValueError, match="needs an SPS table"):
        speculative_generate_batch(target, drafter, PROMPTS, max_new_tokens=4, temperature=0.0,
                                   generators=[None] * len(PROMPTS), batch_size=2, verify_policy="scheduler")
    with pytest.raises(ValueError, match="'greedy' is not one of full, threshold, scheduler, scheduler_async"):
        _run(target, drafter, "greedy", 0.0)
    with pytest.raises(ValueError, match="threshold needs confidence_threshold > 0"):
        _run(target, drafter, "threshold", 0.0)


def test_device_sps_table_is_found_or_its_absence_warned_once(tmp_path):
    with pytest.warns(UserWarning, match=r"no SPS table for device cpu .*tools/profile_sps.py .*--out "):
        flat = load_device_sps("", tmp_path, "cpu", max_rows=4, gamma=9)
    assert flat(1) == flat(40) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per table path and process
        load_device_sps("", tmp_path, "cpu", max_rows=4, gamma=9)
    path = default_sps_path(tmp_path, "cpu")
    path.parent.mkdir()
    path.write_text(json.dumps({"version": 1, "sps": {"1": 50.0, "40": 10.0}, "device_tag": "cpu"}))
    assert load_device_sps("", tmp_path, "cpu", max_rows=4, gamma=9)(40) == 10.0
    with pytest.raises(ValueError, match=r"covers 1\.\.40 batch tokens but decoding can reach 1\.\.64"):
        load_device_sps("", tmp_path, "cpu", max_rows=8, gamma=7)
    with pytest.raises(ValueError, match="eval.sps_table=.*missing.json does not exist"):
        load_device_sps(str(tmp_path / "missing.json"), tmp_path, "cpu", max_rows=4, gamma=9)
