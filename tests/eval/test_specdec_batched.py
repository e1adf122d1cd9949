"""Batched evaluation: the HF batched decode session against one session per sequence, and speculative decoding
whose tokens and accept counts are the same for batch sizes 1 and 4 (and for the single-sequence path), with
prompts of different lengths finishing at different steps, plus the static confidence cut."""

from __future__ import annotations

import contextlib

import pytest
import torch
from eval_drafters import (
    FixedDistributionDrafter,
    OracleDrafter,
    arbitrary_distribution,
)

from dspark.config import DrafterConfig, DSparkConfig, Eagle3Config, TargetConfig
from dspark.eval.specdec import (
    evaluate,
    prompt_seed,
    speculative_generate,
    speculative_generate_batch,
    target_generate,
)
from dspark.targets import load_target

PROMPTS = [[1, 504, 2683, 314, 253], [1, 9690, 28, 44], [1, 17, 2000, 31, 7, 900, 12], [1, 5, 6],
           [1, 77, 78, 79, 80, 81, 82, 83, 84], [1, 300, 301, 302, 303]]


@pytest.fixture(scope="module")
def target(tiny_llama_dir, one_thread):
    return load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[-1, 0, 2]))


class SeededOracle(OracleDrafter):
    """The oracle with its corruption (T = 0) drawn from the per-prompt generator, so that it does not depend on
    the order prompts are drafted in, and at T > 0 drafting from the target at ``draft_temperature_ratio`` times
    the temperature (reporting that distribution): partial acceptance at any temperature, still lossless."""

    def __init__(self, target, block_size: int, corrupt_prob: float, draft_temperature_ratio: float):
        super().__init__(target, block_size, corrupt_prob=corrupt_prob)
        self.ratio = draft_temperature_ratio

    def propose(self, context_TLH, anchor_id, *, temperature, generator=None):
        self.corrupt_gen = generator
        return super().propose(context_TLH, anchor_id, temperature=temperature * self.ratio, generator=generator)


def test_batched_session_matches_one_session_per_sequence(target):
    session = target.batch_decode_session()
    singles = [target.decode_session() for _ in range(3)]

    def check(outputs, rows, feeds):
        for output, row, ids in zip(outputs, rows, feeds):
            if ids.numel() == 0:  # the row sat the step out
                assert output is None
                continue
            logits_NV, features_NLH = output
            ref_logits_NV, ref_features_NLH = singles[row].extend(ids)
            torch.testing.assert_close(logits_NV, ref_logits_NV, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(features_NLH, ref_features_NLH, atol=2e-5, rtol=1e-4)

    session.add_rows(2)
    feeds = [torch.tensor(PROMPTS[0]), torch.tensor(PROMPTS[1])]
    check(session.extend(feeds), [0, 1], feeds)
    session.add_rows(1)  # a prompt joins rows that are already decoding
    feeds = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor(PROMPTS[2])]
    check(session.extend(feeds), [0, 1, 2], feeds)
    session.truncate([6, 5, 7])  # rows roll back by different amounts
    singles[0].truncate(6)
    assert session.lengths == [6, 5, 7]
    session.select([2, 0])  # row 1 finished
    feeds = [torch.tensor([9, 10]), torch.tensor([11, 12, 13, 14])]
    check(session.extend(feeds), [2, 0], feeds)
    assert session.lengths == [9, 10]
    # A prompt prefilled alone (the others sit out, the cache part narrower than the whole), then a step where
    # it sits out and the others grow wider than the whole; the rows that sat out keep their cache.
    session.add_rows(1)
    singles.append(target.decode_session())
    empty = torch.empty(0, dtype=torch.long)
    for feeds in ([empty, empty, torch.tensor(PROMPTS[4][:4])], [torch.tensor([15, 16, 17]), torch.tensor([18]), empty],
                  [torch.tensor([19]), torch.tensor([20, 21]), torch.tensor(PROMPTS[4][4:])]):
        check(session.extend(feeds), [2, 0, 3], feeds)
    assert session.lengths == [13, 13, 9]
    # last_only: a prefilled row gets its last position's logits alone, the others all of theirs; same values.
    session.add_rows(1)
    singles.append(target.decode_session())
    feeds = [torch.tensor([22]), empty, torch.tensor([23, 24]), torch.tensor(PROMPTS[5])]
    outputs = session.extend(feeds, last_only=[False, False, False, True])
    assert outputs[1] is None and [out[0].shape[0] for i, out in enumerate(outputs) if i != 1] == [1, 2, 1]
    for row, (out, ids) in zip([2, 3, 4], [(outputs[0], feeds[0]), (outputs[2], feeds[2]), (outputs[3], feeds[3])]):
        ref_logits_NV, ref_features_NLH = singles[row].extend(ids)
        torch.testing.assert_close(out[0], ref_logits_NV[-out[0].shape[0]:], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[1], ref_features_NLH, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="last_only flags"):
        session.extend(feeds, last_only=[True])
    with pytest.raises(ValueError, match="one id tensor per row"):
        session.extend([torch.tensor([1])])
    with pytest.raises(ValueError, match="at least one non-empty"):
        session.extend([empty, empty, empty])
    with pytest.raises(ValueError, match="none longer"):
        session.truncate([10, 10, 10, 10])


def _run(target, drafter, batch_size: int, temperature: float, stop_ids=()):
    generators = [torch.Generator().manual_seed(prompt_seed(7, i)) for i in range(len(PROMPTS))]
    return speculative_generate_batch(target, drafter, PROMPTS, max_new_tokens=14, temperature=temperature,
                                      generators=generators, batch_size=batch_size, stop_ids=stop_ids)


def _records(results):
    return [(r.tokens, r.accepted, r.proposed) for r in results]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_results_do_not_depend_on_the_batch_size(target, temperature):
    drafter = SeededOracle(target, 4, corrupt_prob=0.3, draft_temperature_ratio=1.5)
    stop_ids = [_run(target, drafter, 4, temperature)[0].tokens[6]]  # some rows stop early, others run on
    one = _run(target, drafter, 1, temperature, stop_ids)
    four = _run(target, drafter, 4, temperature, stop_ids)
    assert _records(one) == _records(four)
    # Partial acceptance (so per-row rollback) and rows of different lengths were exercised.
    assert any(0 < a < p for r in four for a, p in zip(r.accepted, r.proposed))
    assert len({len(r.tokens) for r in four}) > 1
    # The single-sequence path gives the same tokens, and at T = 0 they are the target's own.
    for i, prompt in enumerate(PROMPTS):
        alone = speculative_generate(target, drafter, prompt, max_new_tokens=14, temperature=temperature,
                                     generator=torch.Generator().manual_seed(prompt_seed(7, i)), stop_ids=stop_ids)
        assert (alone.tokens, alone.accepted, alone.proposed) == _records(four)[i]
        if temperature == 0:
            assert alone.tokens == target_generate(target, prompt, max_new_tokens=14, temperature=0.0,
                                                   stop_ids=stop_ids)


class _RecordingTarget:
    """The target, with a batched session that records the tokens fed to each row at every step."""

    def __init__(self, target):
        self.target, self.steps = target, []

    def __getattr__(self, name):
        return getattr(self.target, name)

    def batch_decode_session(self):
        session, steps = self.target.batch_decode_session(), self.steps

        class Recording:
            partial_steps = session.partial_steps

            def __getattr__(self, name):
                return getattr(session, name)

            def extend(self, ids, last_only=None):
                steps.append([x.numel() for x in ids])
                return session.extend(ids, last_only)

        return Recording()


def test_prompts_admitted_mid_run_are_prefilled_apart(target):
    # 6 prompts at batch 4: prompts 4 and 5 join rows that are decoding. Each is prefilled in a forward where the
    # decoding rows sit out (fed beside their drafts it would pad them all to its length); the tokens are those
    # of prefilling beside them (prefill_apart=False), where no row ever sits out.
    drafter = SeededOracle(target, 4, corrupt_prob=0.3, draft_temperature_ratio=1.5)
    runs, steps = [], []
    for prefill_apart in (True, False):
        recording = _RecordingTarget(target)
        generators = [torch.Generator().manual_seed(prompt_seed(7, i)) for i in range(len(PROMPTS))]
        runs.append(speculative_generate_batch(recording, drafter, PROMPTS, max_new_tokens=14, temperature=0.0,
                                               generators=generators, batch_size=4, prefill_apart=prefill_apart))
        steps.append(recording.steps)
    assert _records(runs[0]) == _records(runs[1])
    assert steps[0][0] == [len(p) for p in PROMPTS[:4]]  # the first prompts are prefilled together
    partial = [[n for n in fed if n] for fed in steps[0] if 0 in fed]
    assert sorted(n for fed in partial for n in fed) == sorted(len(p) for p in PROMPTS[4:])
    assert all(len(fed) == 1 for fed in partial)  # one prompt per forward here (admitted at different steps)
    assert not any(0 in fed for fed in steps[1])


def test_prefill_groups_bound_the_padding():
    from dspark.eval.specdec import prefill_groups

    assert prefill_groups([]) == []
    assert prefill_groups([5, 4, 7, 3]) == [[3, 1, 0, 2]]  # tiny prompts: one forward, padding is cheap
    # Padded together 16 x 300 = 4800 positions for 2560 real ones; grouped, each group wastes at most 25% of its
    # real positions + 64.
    lengths = [300, 100, 100, 140, 100, 300, 100, 140, 100, 140, 100, 300, 100, 140, 100, 300]
    groups = prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(16))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[100] * 8, [140] * 4, [300] * 4]
    for group in groups:
        real = sum(lengths[i] for i in group)
        assert max(lengths[i] for i in group) * len(group) - real <= 0.25 * real + 64


def test_prompts_of_very_different_lengths_are_prefilled_in_groups(target):
    # Two long prompts and three short ones admitted together: two prefill forwards (short ones, long ones), and
    # the tokens are those of decoding each prompt alone.
    drafter = SeededOracle(target, 4, corrupt_prob=0.3, draft_temperature_ratio=1.5)
    prompts = [PROMPTS[3], [1] + list(range(400, 560)), PROMPTS[1], [1] + list(range(600, 740)), PROMPTS[0]]
    recording = _RecordingTarget(target)
    generators = [torch.Generator().manual_seed(prompt_seed(7, i)) for i in range(len(prompts))]
    grouped = speculative_generate_batch(recording, drafter, prompts, max_new_tokens=10, temperature=0.0,
                                         generators=generators, batch_size=5)
    assert recording.steps[:2] == [[3, 0, 4, 0, 5], [0, 161, 0, 141, 0]]
    generators = [torch.Generator().manual_seed(prompt_seed(7, i)) for i in range(len(prompts))]
    alone = speculative_generate_batch(target, drafter, prompts, max_new_tokens=10, temperature=0.0,
                                       generators=generators, batch_size=1)
    assert _records(grouped) == _records(alone)


def test_evaluate_report_is_the_same_for_batch_sizes_1_and_4(tiny_llama_dir, one_thread):
    from dspark.drafters import build_drafter

    dspark_target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 2]))
    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfig(block_size=4, dspark=DSparkConfig(markov_rank=16)), dspark_target.config,
                            dspark_target.layer_ids, dspark_target.embed_weight, dspark_target.lm_head_weight)
    reports = [evaluate(dspark_target, drafter, PROMPTS, max_new_tokens=10, temperature=1.0, seed=3,
                        batch_size=batch_size).to_dict() for batch_size in (1, 4)]
    calibrations = []
    for report in reports:
        report.pop("wall_s"), report.pop("tokens_per_s")
        calibrations.append(report.pop("calibration"))
    assert reports[0] == reports[1]  # tokens, rounds, acceptance: exactly
    # Confidences come from target features, equal only up to the float rounding of the batched forward.
    assert calibrations[0]["num_pairs"] >= reports[0]["num_rounds"] > 0
    for key, value in calibrations[0].items():
        values = value if isinstance(value, list) else [value]
        others = calibrations[1][key] if isinstance(value, list) else [calibrations[1][key]]
        assert [v is None for v in values] == [v is None for v in others], key
        assert [v for v in values if v is not None] == pytest.approx([v for v in others if v is not None],
                                                                     abs=1e-5), key


def test_confidence_threshold_cuts_proposals_and_stays_lossless(target):
    vocab = target.embed_weight.shape[0]
    drafter = FixedDistributionDrafter(arbitrary_distribution(vocab, list(range(5, 400)), seed=2), block_size=4)
    # Confidence 0.5 at every slot: cumulative 0.5, 0.25, 0.125, ...; a cut at 0.2 keeps two drafts.
    kwargs = {"max_new_tokens": 12, "temperature": 0.0, "seed": 0, "batch_size": 4}
    full = evaluate(target, drafter, PROMPTS, **kwargs)
    cut = evaluate(target, drafter, PROMPTS, confidence_threshold=0.2, **kwargs)
    assert full.mean_proposal_len > 3.0 and 1.8 < cut.mean_proposal_len <= 2.0  # the budget cuts the last round
    assert cut.confidence_threshold == 0.2 and len(cut.acceptance_K) == 2
    generators = [None] * len(PROMPTS)
    results = speculative_generate_batch(target, drafter, PROMPTS, max_new_tokens=12, temperature=0.0,
                                         generators=generators, batch_size=4, confidence_threshold=0.6)
    for prompt, result in zip(PROMPTS, results):
        assert set(result.proposed) == {0}  # 0.5 < 0.6 already at slot 1: the target decodes alone
        assert result.tokens == target_generate(target, prompt, max_new_tokens=12, temperature=0.0)


@pytest.mark.parametrize("algorithm", ["dspark", "eagle3"])
def test_batched_proposals_decode_like_row_by_row_proposals(tiny_llama_dir, one_thread, algorithm):
    # One ``propose_batch`` call per step for the rows in flight (different context lengths; 6 prompts at batch 4,
    # so rows leave and join) against one ``propose`` call per row: the same tokens and rounds (Eagle3 with a
    # pruned vocab).
    from dspark.drafters import build_drafter

    features_target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 2]))
    dspark = algorithm == "dspark"
    cfg = (DrafterConfig(block_size=4, dspark=DSparkConfig(markov_rank=16)) if dspark else
           DrafterConfig(algorithm=algorithm, block_size=4, eagle3=Eagle3Config(draft_vocab_size=600)))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="draft vocab") if not dspark else contextlib.nullcontext():
        drafter = build_drafter(cfg, features_target.config, features_target.layer_ids,
                                features_target.embed_weight, features_target.lm_head_weight).eval()
    runs = []
    for batch_proposals in (True, False):
        generators = [torch.Generator().manual_seed(prompt_seed(5, i)) for i in range(len(PROMPTS))]
        runs.append(speculative_generate_batch(features_target, drafter, PROMPTS, max_new_tokens=12,
                                               temperature=1.0, generators=generators, batch_size=4,
                                               batch_proposals=batch_proposals))
    assert _records(runs[0]) == _records(runs[1])
    assert all(len(r.accepted) >= 3 for r in runs[0])  # several rounds per row (6 prompts: rows joined mid-run)
    for batched, row_by_row in zip(*runs):
        assert len(batched.confidences) == len(row_by_row.confidences) == (len(batched.accepted) if dspark else 0)
        for a, b in zip(batched.confidences, row_by_row.confidences):
            assert a == pytest.approx(b, abs=1e-6)
