"""Acceptance metrics on hand-made round records, the JSON form of a report and the side-by-side table."""

from __future__ import annotations

import json
import math

import pytest

from dspark.eval.metrics import EvalReport, conditional_acceptance, format_table, prefix_survival, tau

# Five rounds of up to 3 drafts; round 4 was cut to 2 drafts (e.g. by the token budget).
ACCEPTED = [0, 2, 3, 1, 3]
PROPOSED = [3, 3, 3, 2, 3]


def test_metrics_on_hand_made_rounds():
    assert tau(ACCEPTED) == pytest.approx((1 + 3 + 4 + 2 + 4) / 5)
    # k=1: all 5 rounds reach slot 1, 4 pass. k=2: rounds 2-5 passed slot 1 and proposed >= 2; 3 of them pass.
    # k=3: rounds 2, 3, 5 passed slot 2 and proposed 3; rounds 3 and 5 pass.
    assert conditional_acceptance(ACCEPTED, PROPOSED) == pytest.approx([4 / 5, 3 / 4, 2 / 3])
    # Survival: k=1 4/5; k=2 rounds 2, 3, 5 of all 5; k=3 rounds 3, 5 of the 4 that proposed 3.
    assert prefix_survival(ACCEPTED, PROPOSED) == pytest.approx([4 / 5, 3 / 5, 2 / 4])
    # Asking past the longest proposal gives NaN (no data), not 0.
    assert math.isnan(conditional_acceptance(ACCEPTED, PROPOSED, num_positions=4)[3])


def test_report_dict_is_json_safe_and_complete():
    report = EvalReport.from_rounds(ACCEPTED, PROPOSED, generated_tokens=17, num_prompts=2, wall_s=0.5,
                                    temperature=0.0)
    assert (report.num_rounds, report.tau, report.mean_proposal_len) == (5, 2.8, 2.8)
    assert report.tokens_per_s == 34.0
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()

    empty = EvalReport.from_rounds([], [], generated_tokens=2, num_prompts=2, wall_s=0.1, temperature=1.0)
    as_dict = empty.to_dict()
    assert as_dict["tau"] is None and as_dict["acceptance_K"] == [] and as_dict["num_rounds"] == 0
    json.dumps(as_dict, allow_nan=False)


def test_bad_round_records_are_refused():
    with pytest.raises(ValueError, match="accepted has 2 rounds but proposed has 3"):
        conditional_acceptance([1, 2], [3, 3, 3])
    with pytest.raises(ValueError, match=r"round 1: accepted 4 is not within 0..proposed \(3\)"):
        prefix_survival([1, 4], [3, 3])
    with pytest.raises(ValueError, match="at least one report"):
        format_table({})


def test_table_shows_drafters_side_by_side():
    good = EvalReport.from_rounds(ACCEPTED, PROPOSED, generated_tokens=17, num_prompts=2, wall_s=0.5,
                                  temperature=0.0)
    short = EvalReport.from_rounds([0, 1], [1, 1], generated_tokens=4, num_prompts=2, wall_s=0.0, temperature=0.0)
    good.target_tokens_per_s = 20.0
    lines = format_table({"trained": good, "untrained": short}).splitlines()
    assert lines[0].split() == ["drafter", "tau", "len", "rounds", "tokens", "tok/s", "vs_tgt", "acc@1", "acc@2",
                                "acc@3"]
    assert lines[2].split() == ["trained", "2.800", "2.80", "5", "17", "34.0", "1.70", "0.800", "0.750", "0.667"]
    assert good.to_dict()["speedup_vs_target"] == pytest.approx(1.7)
    # Missing values (no wall time, no target baseline, slots never proposed) print as '-'.
    assert lines[3].split() == ["untrained", "1.500", "1.00", "2", "4", "-", "-", "0.500", "-", "-"]
    assert len({len(line) for line in lines}) == 1  # fixed width
