"""Drafting stops at the first slot no row could verify from (``Drafter.cuts_drafting``, ``draft_slots``): the
slots before the stop are those of the full proposal, the scheduler's stop rule never cuts a draft it would have
verified (random cases, random completions), and greedy decoding under the scheduler or a confidence threshold
verifies exactly what it verified with full proposals while drafting fewer slots."""

from __future__ import annotations

import random

import pytest
import torch

from dspark.config import DrafterConfig, DSparkConfig, TargetConfig
from dspark.eval.scheduler import SPSTable, VerifyPlanner, schedule_common_prefix, schedule_prefixes
from dspark.eval.specdec import prompt_seed, speculative_generate_batch
from dspark.targets import load_target

PROMPTS = [[1, 504, 2683, 314, 253], [1, 9690, 28, 44], [1, 17, 2000, 31, 7, 900, 12], [1, 5, 6],
           [1, 77, 78, 79, 80, 81, 82, 83, 84], [1, 300, 301, 302, 303]]


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, one_thread):
    from dspark.drafters import build_drafter

    target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 2]))
    torch.manual_seed(0)
    cfg = DrafterConfig(block_size=4, dspark=DSparkConfig(markov_rank=16, enable_confidence_head=True))
    drafter = build_drafter(cfg, target.config, target.layer_ids, target.embed_weight, target.lm_head_weight).eval()
    assert drafter.cuts_drafting
    return target, drafter


class Counting:
    """``drafter`` counting the slots it drafts; ``cuts=False`` hides its ``stop_drafting`` support."""

    def __init__(self, drafter, cuts: bool):
        self.drafter, self.cuts_drafting, self.drafted = drafter, cuts and drafter.cuts_drafting, 0

    def __getattr__(self, name):
        return getattr(self.drafter, name)

    def propose_batch(self, *args, **kwargs):
        proposals = self.drafter.propose_batch(*args, **kwargs)
        self.drafted += sum(p.tokens_K.numel() for p in proposals)
        return proposals


def _contexts(target):
    features = [target.features(torch.tensor([p])).layers_BTLH[0] for p in PROMPTS[:3]]
    return features, [p[-1] for p in PROMPTS[:3]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_stopped_draft_keeps_the_slots_before_the_stop(setup, temperature):
    target, drafter = setup
    contexts, anchors = _contexts(target)

    def propose(stop=None):
        generators = [torch.Generator().manual_seed(i) for i in range(3)]
        drafter.reset_context_cache()
        return drafter.propose_batch(contexts, anchors, temperature=temperature, generators=generators,
                                     stop_drafting=stop)

    full = propose()
    asked = []

    def stop_at_third(confidences):
        asked.append([len(c) for c in confidences])
        return len(confidences[0]) == 3

    cut = propose(stop_at_third)
    assert asked == [[1, 1, 1], [2, 2, 2], [3, 3, 3]]  # asked after each slot's confidence, every row
    for whole, part in zip(full, cut):
        assert part.tokens_K.tolist() == whole.tokens_K[:2].tolist()
        torch.testing.assert_close(part.probs_KV, whole.probs_KV[:2])
        torch.testing.assert_close(part.confidence_K, whole.confidence_K[:2])
    vocab = target.config.vocab_size
    for empty in propose(lambda confidences: True):  # stopped at the first slot: no LM head at all
        assert empty.tokens_K.shape == (0,) and empty.probs_KV.shape == (0, vocab)
        assert empty.confidence_K.shape == (0,)


@pytest.mark.parametrize("padded", [False, True])
def test_the_scheduler_stop_never_cuts_a_draft_it_would_verify(padded):
    rng = random.Random(0)
    sps = SPSTable.per_rows({1: {1: 100.0, 3: 70.0, 5: 40.0}, 4: {1: 30.0, 2: 22.0, 5: 12.0}})
    planner = VerifyPlanner("scheduler", sps=sps, padded=padded)
    schedule = schedule_common_prefix if padded else schedule_prefixes
    decisions = {True: 0, False: 0}
    for _ in range(1000):
        R, K = rng.randint(1, 4), 4
        full = [[rng.choice([rng.random(), 0.9, 0.99, 0.05]) for _ in range(K)] for _ in range(R)]
        for slot in range(1, K + 1):
            may = planner.may_verify_from([c[:slot] for c in full], slot)
            decisions[may] += 1
            if not may:  # whatever the later confidences are, nothing from this slot on is verified
                completions = [[1.0] * (K - slot)] + [[rng.random() for _ in range(K - slot)] for _ in range(3)]
                for later in completions:  # all ones: every later draft as likely as the one at the slot
                    completed = [c[:slot] + later for c in full]
                    assert all(j < slot for j in schedule(completed, sps).prefix_R)
                break
    assert decisions[True] > 50 and decisions[False] > 50  # both answers occur: the check has power
    # The other policies verify whatever is drafted.
    assert VerifyPlanner("full").may_verify_from([[0.0]], 1)
    assert VerifyPlanner("scheduler_async", sps=sps).may_verify_from([[0.0]], 1)


def _decode(target, drafter, policy: str, sps=None, threshold: float = 0.0):
    generators = [torch.Generator().manual_seed(prompt_seed(5, i)) for i in range(len(PROMPTS))]
    return speculative_generate_batch(target, drafter, PROMPTS, max_new_tokens=12, temperature=0.0,
                                      generators=generators, batch_size=3, verify_policy=policy, sps=sps,
                                      confidence_threshold=threshold)


@pytest.mark.parametrize("policy", ["scheduler", "threshold"])
def test_cut_drafting_verifies_what_full_drafting_verified(setup, policy):
    target, drafter = setup
    # Drafts get dearer with every token (scheduler), or a threshold near the drafter's typical survival.
    sps = SPSTable.per_rows({1: {1: 100.0, 5: 60.0}, 2: {1: 80.0, 5: 35.0}, 3: {1: 70.0, 5: 25.0}})
    full = _decode(target, drafter, "full")
    survivals = sorted(c[0] * c[1] for r in full for c in r.confidences if len(c) >= 2)
    threshold = survivals[len(survivals) // 2] if policy == "threshold" else 0.0
    runs = {}
    for cuts in (False, True):
        counting = Counting(drafter, cuts)
        results = _decode(target, counting, policy, sps=sps if policy == "scheduler" else None, threshold=threshold)
        runs[cuts] = ([(r.tokens, r.accepted, r.proposed, r.confidences) for r in results], counting.drafted)
    assert runs[True][0] == runs[False][0]  # the same tokens, rounds, verified prefixes and confidences
    assert runs[True][1] < runs[False][1]  # fewer slots drafted
    proposed = [p for r in runs[True][0] for p in r[2]]
    assert any(p > 0 for p in proposed) and any(p < 4 for p in proposed)  # some drafts verified, some cut
