"""Prefix scheduler: Algorithm 1 against brute force over every prefix allocation, its early stop, the constant-SPS
case, the asynchronous capacity form, the replay of recorded rounds, and the SPS table (interpolation, refusals)."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from dspark.eval.scheduler import (
    SPSTable,
    format_simulation,
    schedule_capacity,
    schedule_common_prefix,
    schedule_prefixes,
    simulate,
    survival,
)


def _random_case(rng: random.Random):
    R, K = rng.randint(1, 3), rng.randint(1, 3)
    conf = [[rng.choice([rng.random(), 1.0, 0.0, 0.5]) for _ in range(K)] for _ in range(R)]
    # A decreasing throughput curve over every batch size the step can reach (R .. R * (K + 1)).
    points, sps = {}, 100.0
    for tokens in range(R, R * (K + 1) + 1):
        points[tokens] = sps
        sps *= rng.uniform(0.75, 1.0)
    return conf, SPSTable(points)


def _brute_force(conf, sps):
    """Per number n of admitted drafts, the best expected tokens over *every* prefix allocation with n drafts;
    then where Algorithm 1 must stop: before the first n whose throughput does not exceed n - 1's."""
    a = survival(conf)
    R, K = len(conf), len(conf[0])
    best = {}
    for prefix in itertools.product(range(K + 1), repeat=R):
        n = sum(prefix)
        tau = R + sum(sum(a[r][:j]) for r, j in enumerate(prefix))
        best[n] = max(best.get(n, -1.0), tau)
    throughput = [best[n] * sps(R + n) for n in range(R * K + 1)]
    stop = next((n for n in range(1, R * K + 1) if throughput[n] <= throughput[n - 1]), R * K + 1)
    return best, stop - 1


def test_algorithm1_matches_brute_force_on_small_cases():
    rng = random.Random(0)
    for _ in range(300):
        conf, sps = _random_case(rng)
        best, admitted = _brute_force(conf, sps)
        s = schedule_prefixes(conf, sps)
        R = len(conf)
        assert s.batch_tokens == R + admitted == R + sum(s.prefix_R)
        # Admitting by descending survival is the best allocation of that many drafts, and a prefix per request.
        assert s.expected_tokens == pytest.approx(best[admitted], abs=1e-12)
        a = survival(conf)
        assert s.expected_tokens == pytest.approx(R + sum(sum(a[r][:j]) for r, j in enumerate(s.prefix_R)))


def test_algorithm1_stops_at_the_first_non_improving_admission():
    # a = 0.9, 0.72, 0.684. Throughput tau* x SPS(B): 100 (B=1), 1.9 x 90 = 171, 2.62 x 80 = 209.6, then
    # 3.304 x 50 = 165.2 does not improve: the third draft is not admitted.
    sps = SPSTable({1: 100.0, 2: 90.0, 3: 80.0, 4: 50.0})
    s = schedule_prefixes([[0.9, 0.8, 0.95]], sps)
    assert s.prefix_R == [2] and s.batch_tokens == 3 and s.expected_tokens == pytest.approx(2.62)
    # The stop is final even when a later admission would pay off again (Algorithm 1 does not look ahead):
    # 1.95 x 51 < 100, though 2.85 x 50 > 100.
    sps = SPSTable({1: 100.0, 2: 51.0, 3: 50.0, 4: 50.0})
    assert schedule_prefixes([[0.95, 0.95, 0.95]], sps).prefix_R == [0]


def test_constant_sps_admits_every_draft_with_positive_survival():
    sps = SPSTable({1: 10.0, 100: 10.0})
    conf = [[0.9, 0.0, 0.5], [0.8, 0.7, 0.6], [0.0, 1.0, 1.0], [1e-9, 0.5, 0.5]]
    assert schedule_prefixes(conf, sps).prefix_R == [1, 3, 0, 3]


def test_survival_ties_keep_prefixes():
    # c = 1 makes a_{r,j} = a_{r,j+1}; the tie goes to the smaller j, so no request gets a hole.
    conf = [[0.5, 1.0, 1.0], [0.6, 1.0, 0.1]]  # a = [0.5, 0.5, 0.5], [0.6, 0.6, 0.06]
    assert [schedule_capacity(conf, n).prefix_R for n in range(1, 7)] == [[0, 1], [0, 2], [1, 2], [2, 2], [3, 2],
                                                                          [3, 3]]


def test_async_capacity_admits_exactly_the_top_pairs():
    conf = [[0.9, 0.2, 0.1], [0.8, 0.7, 0.6]]
    assert schedule_capacity(conf, 0).prefix_R == [0, 0]
    assert schedule_capacity(conf, 2).prefix_R == [1, 1]
    s = schedule_capacity(conf, 3)
    assert s.prefix_R == [1, 2] and s.batch_tokens == 5 and s.expected_tokens == pytest.approx(2 + 0.9 + 0.8 + 0.56)
    assert schedule_capacity(conf, 99).prefix_R == [3, 3]  # capped at the drafts there are
    # No early stop: a pair with a = 0 is still admitted when capacity reaches it.
    assert schedule_capacity([[0.0, 0.0]], 2).prefix_R == [2]
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        schedule_capacity(conf, -1)


def test_simulate_replays_rounds_with_continuous_batching():
    K = 3
    sps = SPSTable({1: 100.0, 2: 95.0, 3: 90.0, 4: 70.0, 5: 60.0, 6: 55.0, 7: 50.0, 8: 45.0})
    rng = random.Random(1)
    prompts = [[(rng.randint(0, K), [rng.random() for _ in range(K)]) for _ in range(n)] for n in (3, 1, 4, 0, 2)]
    stats = simulate(prompts, num_drafts=K, sps=sps, batch_size=2)
    # Continuous batching of 2: prompt 1 ends after step 0 and prompt 2 takes its slot; the empty prompt is skipped.
    expected_steps = [[prompts[0][0], prompts[1][0]], [prompts[0][1], prompts[2][0]], [prompts[0][2], prompts[2][1]],
                      [prompts[2][2], prompts[4][0]], [prompts[2][3], prompts[4][1]]]
    syncs = [schedule_prefixes([c for _, c in step], sps) for step in expected_steps]
    for policy in ("full", "algorithm1", "async"):
        if policy == "full":
            chosen = [schedule_capacity([c for _, c in step], len(step) * K) for step in expected_steps]
        elif policy == "algorithm1":
            chosen = syncs
        else:  # capacity from two steps back; the first two steps verify everything
            chosen = [schedule_capacity([c for _, c in step], len(step) * K if t < 2
                                        else syncs[t - 2].batch_tokens - len(expected_steps[t - 2]))
                      for t, step in enumerate(expected_steps)]
        realised = [sum(min(j, acc) + 1 for j, (acc, _) in zip(s.prefix_R, step))
                    for s, step in zip(chosen, expected_steps)]
        got = stats[policy]
        assert got.num_steps == 5
        assert got.mean_batch_tokens == pytest.approx(sum(s.batch_tokens for s in chosen) / 5)
        assert got.tokens_per_step == pytest.approx(sum(realised) / 5)
        assert got.expected_tokens_per_step == pytest.approx(sum(s.expected_tokens for s in chosen) / 5)
        assert got.tokens_per_s == pytest.approx(sum(realised) / sum(1 / sps(s.batch_tokens) for s in chosen))
    full = stats["full"]
    assert full.mean_batch_tokens == 2 * (K + 1) and full.mean_prefix == K
    assert full.tokens_per_step == pytest.approx(sum(a + 1 for p in prompts for a, _ in p) / 5)
    assert "algorithm1" in format_simulation(stats)


def test_simulate_refuses_rounds_not_drafted_fully():
    sps = SPSTable({1: 1.0, 10: 1.0})
    with pytest.raises(ValueError, match="prompt 0: a round with 2 confidences and 1 accepted"):
        simulate([[(1, [0.5, 0.5])]], num_drafts=3, sps=sps, batch_size=1)
    with pytest.raises(ValueError, match="at least one recorded round"):
        simulate([[]], num_drafts=3, sps=sps, batch_size=1)


def test_sps_table_interpolates_and_refuses_to_extrapolate(tmp_path):
    table = SPSTable({4: 100.0, 8: 80.0, 16: 40.0})
    assert [table(4), table(6), table(8), table(12), table(16)] == pytest.approx([100.0, 90.0, 80.0, 60.0, 40.0])
    for outside in (3, 17):
        with pytest.raises(ValueError, match=f"batch of {outside} tokens is outside the measured range 4..16"):
            table(outside)
    with pytest.raises(ValueError, match="outside the measured range"):
        schedule_prefixes([[0.9, 0.9]] * 2, SPSTable({3: 1.0, 6: 1.0}))  # B starts at R = 2

    versioned = tmp_path / "sps.json"
    versioned.write_text(json.dumps({"version": 1, "target": "t", "sps": {"4": 100.0, "16": 40.0}}))
    assert SPSTable.load(versioned)(10) == pytest.approx(70.0)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"4": 100.0, "16": 40.0}))
    assert SPSTable.load(bare)(16) == 40.0
    for content, message in [({"version": 9, "sps": {"4": 1.0}}, "version 9 is not supported"),
                             ({"four": 1.0}, "key 'four' is not an integer"),
                             ({"4": -1.0}, "steps/s > 0"), ({}, "no measured points")]:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            SPSTable.load(bad)
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="is not valid JSON"):
        SPSTable.load(bad)
    with pytest.raises(ValueError, match="does not exist"):
        SPSTable.load(tmp_path / "missing.json")
    assert math.isfinite(SPSTable({5: 2.0})(5))


def test_sps_table_by_rows_interpolates_per_row_then_across_rows(tmp_path):
    table = SPSTable.per_rows({1: {1: 100.0, 3: 60.0}, 4: {1: 40.0, 3: 20.0}})
    assert table(2, rows=1) == pytest.approx(80.0)  # 2 tokens per row on the 1-row curve
    assert table(8, rows=4) == pytest.approx(30.0)  # 2 tokens per row on the 4-row curve
    assert table(4, rows=2) == pytest.approx(80.0 + (30.0 - 80.0) / 3)  # 2 tokens per row, a third of the way
    with pytest.raises(ValueError, match="measured per row count: give the step's rows"):
        table(4)
    with pytest.raises(ValueError, match="a step of 5 rows is outside the measured row counts 1..4"):
        table(5, rows=5)
    with pytest.raises(ValueError, match="4 tokens per row is outside the range measured at 1 rows, 1..3"):
        table(4, rows=1)
    table.check_covers(4, gamma=2)
    with pytest.raises(ValueError, match=r"covers 1\.\.4 rows but decoding can run 1\.\.8"):
        table.check_covers(8, gamma=2)
    with pytest.raises(ValueError, match=r"covers 1\.\.3 tokens per row at 1 rows but decoding can verify 1\.\.4"):
        table.check_covers(4, gamma=3)

    path = tmp_path / "sps.json"
    path.write_text(json.dumps({"version": 2, "sps_by_rows": {"1": {"1": 100.0, "3": 60.0},
                                                               "4": {"1": 40.0, "3": 20.0}}}))
    assert SPSTable.load(path)(4, rows=2) == pytest.approx(table(4, rows=2))
    for content, message in [({"version": 3, "sps": {"4": 1.0}}, "version 3 is not supported"),
                             ({"version": 2, "sps_by_rows": {"two": {"1": 1.0}}}, "key 'two' is not an integer"),
                             ({"version": 2, "sps_by_rows": {"2": {"1": 0.0}}}, r"rows 2: tokens per row\), got 1"),
                             ({"version": 2, "sps_by_rows": {}}, "no measured row counts")]:
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            SPSTable.load(path)


def test_scheduler_prices_a_step_on_its_own_row_count():
    # One row: 4 tokens cost 2x one. Four rows: one token each is slow (25 steps/s, attention per row) but
    # a second token per row adds little (20 steps/s). The batch-token view averages 1 row x 4 and 4 rows x 1 at
    # B = 4 (37.5), which makes the fifth token look dear: it refuses every draft that the 4-row curve pays for.
    by_rows = SPSTable.per_rows({1: {1: 100.0, 4: 50.0}, 4: {1: 25.0, 2: 20.0}})
    view = SPSTable(dict(zip(by_rows.tokens, by_rows.sps)))
    assert view(4) == pytest.approx(37.5)
    assert schedule_prefixes([[0.5]] * 4, by_rows).prefix_R == [1, 1, 1, 1]
    assert schedule_prefixes([[0.5]] * 4, view).prefix_R == [0, 0, 0, 0]
    assert schedule_prefixes([[0.9, 0.9, 0.9]], by_rows).prefix_R == [2]  # 1.9 x 83.3, 2.71 x 66.7, not 3.44 x 50
    # The simulation plans and prices each step on its rows too: every draft admitted and accepted, 4 x 2 tokens
    # in one step at 4 rows x 2 tokens (20 steps/s).
    stats = simulate([[(1, [0.5])]] * 4, num_drafts=1, sps=by_rows, batch_size=4)
    assert stats["algorithm1"].mean_prefix == 1 and stats["algorithm1"].tokens_per_s == pytest.approx(4 * 2 * 20.0)


def test_common_prefix_grows_while_a_padded_step_pays():
    # A padded step of R rows costs R x (1 + m) tokens: m grows while tau*(m) x SPS(R (1 + m), R) grows.
    rng = random.Random(1)
    sps = SPSTable.per_rows({1: {1: 100.0, 2: 85.0, 5: 60.0}, 3: {1: 60.0, 3: 45.0, 5: 33.0}})
    chosen = set()
    for _ in range(300):
        R = rng.randint(1, 3)
        conf = [[rng.choice([rng.random(), 0.97, 0.05]) for _ in range(rng.randint(0, 4))] for _ in range(R)]
        a = survival(conf)
        value = [(R + sum(sum(row[:m]) for row in a)) * sps(R * (1 + m), R) for m in range(5)]
        longest = max(map(len, conf))
        m = next((j - 1 for j in range(1, longest + 1) if value[j] <= value[j - 1]), longest)
        s = schedule_common_prefix(conf, sps)
        assert s.prefix_R == [min(m, len(c)) for c in conf] and s.batch_tokens == R * (1 + m)
        assert s.expected_tokens == pytest.approx(R + sum(sum(row[:m]) for row in a))
        chosen.add(m)
    assert chosen == {0, 1, 2, 3, 4}  # every common prefix occurs


def test_simulation_of_a_padding_verifier_plans_and_prices_the_common_prefix():
    # One step of two requests, drafts (0.9, 0.9) and (0.1, 0.1), both accepted as far as verified.
    sps = SPSTable.per_rows({2: {1: 100.0, 2: 80.0, 3: 70.0}})
    prompts = [[(2, [0.9, 0.9])], [(2, [0.1, 0.1])]]
    packed = simulate(prompts, num_drafts=2, sps=sps, batch_size=2)["algorithm1"]
    padded = simulate(prompts, num_drafts=2, sps=sps, batch_size=2, padded=True)["algorithm1"]
    common = schedule_common_prefix([[0.9, 0.9], [0.1, 0.1]], sps)
    assert common.prefix_R == [2, 2]  # 2 x 100 < 3 x 80 < 3.91 x 70
    assert padded.mean_prefix == 2 and padded.tokens_per_s == pytest.approx(6 * 70.0)
    # Packed, the first request's drafts are admitted alone and priced at 4 batch tokens over 2 rows, 2 per row.
    assert packed.mean_prefix == 1 and packed.tokens_per_s == pytest.approx(4 / (1 / 80.0))
