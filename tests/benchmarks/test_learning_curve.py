"""``benchmarks/learning_curve.py``'s planning and resume logic: token budgets become ascending step counts, a rerun
skips the budgets already evaluated, and results measured under another LR schedule are refused. (The run itself
trains three drafters on the real target for an hour; it is not a test.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "learning_curve.py"


@pytest.fixture(scope="module")
def curve():
    spec = importlib.util.spec_from_file_location("learning_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_tokens(curve):
    assert [curve.parse_tokens(t) for t in ["22k", "1.5M", "900", " 66K "]] == [22_000, 1_500_000, 900, 66_000]
    for bad in ["", "k", "abc", "-3k", "0", "nan"]:
        with pytest.raises(ValueError, match="token budget"):
            curve.parse_tokens(bad)


def test_plan_budgets_ascending_steps(curve):
    plan = curve.plan_budgets([66_000, 22_000, 130_000], 330.0)
    assert [r["budget_tokens"] for r in plan] == [22_000, 66_000, 130_000]
    assert [r["steps"] for r in plan] == [67, 200, 394]
    assert [r["training_tokens"] for r in plan] == [22_110, 66_000, 130_020]
    assert curve.plan_budgets([10], 330.0)[0]["steps"] == 1  # never a zero-step budget
    with pytest.raises(ValueError, match="both 1 steps"):
        curve.plan_budgets([100, 200], 330.0)


def test_pending_skips_evaluated_budgets(curve):
    plan = curve.plan_budgets([1_000, 2_000, 3_000], 100.0)
    results = {"runs": {"dspark": {"10": {}, "20": {}}, "dflash": {"10": {}}}}
    assert [r["steps"] for r in curve.pending(results, "dspark", plan)] == [30]
    assert [r["steps"] for r in curve.pending(results, "dflash", plan)] == [20, 30]
    assert [r["steps"] for r in curve.pending(results, "eagle3", plan)] == [10, 20, 30]


def test_check_schedule_refuses_another_schedule(curve):
    results = {"plan": {"schedule_steps": 394, "tokens_per_step": 330.2}}
    curve.check_schedule(results, 394, 330.0)
    curve.check_schedule({}, 10, 1.0)
    with pytest.raises(ValueError, match="394-step schedule"):
        curve.check_schedule(results, 200, 330.0)
    with pytest.raises(ValueError, match="tokens per step"):
        curve.check_schedule(results, 394, 400.0)
