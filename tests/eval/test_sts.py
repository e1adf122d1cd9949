"""Sequential Temperature Scaling: recovery of known per-slot temperatures on a synthetic head, the vectorised ECE
against ``calibration.ece``, the sigmoid inversion, and calibration.json through ``load_drafter`` (ones leave the
drafter bit-identical, other values rescale its logits, malformed files are refused)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from dspark.eval import sts
from dspark.eval.calibration import CalibrationReport, ece

GRID_STEP = 0.05
TRUE_T = [1.6, 2.2, 0.7, 1.4]  # over-confident slots (T > 1) and one under-confident (T < 1)


def _synthetic_rounds(num_rounds: int, seed: int):
    """Rounds whose true survival probability at slot k is sigmoid(z_k); the head reports z_k * TRUE_T[k]."""
    gen = torch.Generator().manual_seed(seed)
    z_RK = torch.randn(num_rounds, len(TRUE_T), generator=gen, dtype=torch.float64) * 2.0 + 1.5
    survive_RK = torch.rand(num_rounds, len(TRUE_T), generator=gen, dtype=torch.float64) < torch.sigmoid(z_RK)
    accepted = survive_RK.long().cumprod(1).sum(1).tolist()
    logits = (z_RK * torch.tensor(TRUE_T, dtype=torch.float64)).tolist()
    proposed = [len(TRUE_T)] * num_rounds
    return accepted, proposed, logits


def test_sts_recovers_the_true_temperatures_and_lowers_held_out_ece():
    grid = sts.temperature_grid(0.25, 4.0, GRID_STEP)
    accepted, proposed, logits = _synthetic_rounds(60000, seed=0)
    fitted = sts.fit_sts(accepted, proposed, logits, grid)
    assert len(fitted) == len(TRUE_T)
    for k, (t, true) in enumerate(zip(fitted, TRUE_T), start=1):
        assert abs(t - true) <= GRID_STEP + 1e-9, f"slot {k}: fitted {t}, true {true}"

    held_acc, held_prop, held_logits = _synthetic_rounds(20000, seed=1)
    raw = sts.apply_temperatures(held_logits, [1.0] * len(TRUE_T))
    calibrated = sts.apply_temperatures(held_logits, fitted)
    before = sts.survival_ece_K(held_acc, held_prop, raw)
    after = sts.survival_ece_K(held_acc, held_prop, calibrated)
    for k, (b, a) in enumerate(zip(before, after), start=1):
        assert a < 0.02 < b, f"slot {k}: held-out ECE {b:.4f} -> {a:.4f}"
    pooled_before = CalibrationReport.from_rounds(held_acc, held_prop, raw).survival_ece
    pooled_after = CalibrationReport.from_rounds(held_acc, held_prop, calibrated).survival_ece
    assert pooled_after < pooled_before / 3


def _brute_force_sts(accepted, proposed, logits, grid):
    """The sequential rule written directly over ``calibration.ece`` (pure Python, one candidate at a time)."""
    fitted = []
    for k in range(1, max(proposed) + 1):
        rows = [r for r, p in enumerate(proposed) if p >= k]
        label = [int(accepted[r] >= k) for r in rows]
        best = None
        for t in sorted(grid, key=lambda t: (abs(t - 1.0), t)):
            conf = [math.prod(1 / (1 + math.exp(-z / tt)) for z, tt in zip(logits[r][:k], fitted + [t])) for r in rows]
            score = ece(conf, label)
            if best is None or score < best[0] - 1e-12:
                best = (score, t)
        fitted.append(best[1])
    return fitted


def test_sts_equals_the_sequential_rule_by_brute_force():
    # Slot k is scored with the fitted T_1..T_{k-1} fixed; rounds cut short count only at the slots they reached.
    grid = [0.5, 0.8, 1.0, 1.3, 1.7, 2.2, 3.0]
    accepted, proposed, logits = _synthetic_rounds(400, seed=2)
    rng = random.Random(3)
    for r in range(0, 400, 3):  # some proposals cut short (a token budget), acceptance within them
        proposed[r] = rng.randint(1, len(TRUE_T))
        accepted[r] = min(accepted[r], proposed[r])
        logits[r] = logits[r][: proposed[r]]
    assert sts.fit_sts(accepted, proposed, logits, grid) == _brute_force_sts(accepted, proposed, logits, grid)
    # A slot no round reached is not fitted (calibrate pads it with T = 1).
    assert len(sts.fit_sts([0, 1], [1, 2], [[0.3], [0.2, -0.4]], grid)) == 2


def test_batched_ece_equals_calibration_ece():
    rng = random.Random(0)
    label = [rng.random() < 0.6 for _ in range(500)]
    label = [int(y) for y in label]
    candidates = [[rng.random() ** rng.choice([0.5, 1, 2]) for _ in label] for _ in range(5)]
    candidates[0][:3] = [1.0, 0.0, 14 / 15]  # bin edges: c = 1 in the last bin, c = 14/15 in bin 14
    got = sts.batched_ece(torch.tensor(candidates, dtype=torch.float64), torch.tensor(label))
    for g, conf in zip(got.tolist(), candidates):
        assert g == pytest.approx(ece(conf, label), abs=1e-12)


def test_logits_from_confidences_inverts_the_sigmoid_and_clamps():
    z = [-15.0, -3.0, 0.0, 0.5, 7.0, 10.0, 15.0]
    conf = torch.sigmoid(torch.tensor(z, dtype=torch.float32)).tolist()
    back = sts.logits_from_confidences([conf])[0]
    # fp32 spacing below 1 is 2^-24 (below 0.5 it is finer): the error grows like 6e-8 * e^z for positive z.
    for zi, bi in zip(z, back):
        assert bi == pytest.approx(zi, abs=1e-5 + 2.0**-23 * math.exp(max(zi, 0.0)))
    saturated = sts.logits_from_confidences([[0.0, 1.0]])[0]
    assert all(math.isfinite(x) for x in saturated) and saturated[1] == pytest.approx(-saturated[0]) \
        and 16 < saturated[1] < 17
    with pytest.raises(ValueError, match="round 0: confidence 1.5 is not a probability"):
        sts.logits_from_confidences([[0.5, 1.5]])


def test_temperature_grid_and_bad_inputs():
    assert sts.temperature_grid(0.5, 1.0, 0.1) == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    for args in [(0.0, 1.0, 0.1), (2.0, 1.0, 0.1), (0.5, 1.0, 0.0)]:
        with pytest.raises(ValueError, match="STS grid needs"):
            sts.temperature_grid(*args)
    with pytest.raises(ValueError, match="round 0: 1 logits, 2 proposed"):
        sts.fit_sts([0], [2], [[0.1]], [1.0])
    with pytest.raises(ValueError, match="temperatures > 0"):
        sts.fit_sts([0], [1], [[0.1]], [1.0, -1.0])


# -- calibration.json through load_drafter ----------------------------------------------------------------------

BLOCK = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir):
    from dspark.config import DrafterConfig, DSparkConfig, TargetConfig
    from dspark.drafters import build_drafter
    from dspark.export import export_drafter
    from dspark.targets import load_target

    target = load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[0, 1, 2]))
    root = tmp_path_factory.mktemp("sts_drafters")
    dirs = {}
    for algorithm in ("dspark", "dflash"):
        torch.manual_seed(0)
        heads = {"dspark": DSparkConfig(markov_rank=16)} if algorithm == "dspark" else {}
        cfg = DrafterConfig(algorithm=algorithm, block_size=BLOCK, **heads)
        drafter = build_drafter(cfg, target.config, target.layer_ids, target.embed_weight, target.lm_head_weight)
        dirs[algorithm] = export_drafter(drafter, root / algorithm)
    context_TLH = torch.randn(6, 3, target.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return dirs, context_TLH


def _propose(drafter, context_TLH):
    return drafter.propose(context_TLH, anchor_id=5, temperature=0.0)


def test_unit_temperatures_are_bit_identical_and_others_rescale_the_logits(exported, tmp_path):
    from dspark.export import load_drafter

    dirs, context_TLH = exported
    plain = _propose(load_drafter(dirs["dspark"]), context_TLH)
    sts.write_calibration(dirs["dspark"], [1.0] * BLOCK)
    try:
        ones = _propose(load_drafter(dirs["dspark"]), context_TLH)
        assert torch.equal(plain.tokens_K, ones.tokens_K) and torch.equal(plain.probs_KV, ones.probs_KV)
        assert torch.equal(plain.confidence_K, ones.confidence_K)

        temps = [0.5, 1.0, 2.0, 3.5]
        sts.write_calibration(dirs["dspark"], temps, ece_before=0.2, ece_after=0.1, num_heldout_rounds=7,
                              ece_after_K=[0.1, math.nan])  # NaN = a slot no held-out round reached
        drafter = load_drafter(dirs["dspark"])
        assert drafter.confidence_head.temperature_K.tolist() == temps
        assert "confidence_head.temperature_K" not in drafter.state_dict()  # never in checkpoints or exports
        scaled = _propose(drafter, context_TLH)
        assert torch.equal(plain.tokens_K, scaled.tokens_K)  # the drafts do not change, only the confidences
        expected = sts.apply_temperatures(sts.logits_from_confidences([plain.confidence_K.tolist()]), temps)[0]
        assert scaled.confidence_K.tolist() == pytest.approx(expected, abs=1e-5)
        raw = load_drafter(dirs["dspark"], apply_calibration=False)
        assert torch.equal(_propose(raw, context_TLH).confidence_K, plain.confidence_K)
        payload = json.loads((dirs["dspark"] / sts.CALIBRATION_FILE).read_text())
        assert payload["version"] == 1 and payload["method"] == "sts" and payload["num_heldout_rounds"] == 7
        assert payload["ece_after_K"] == [0.1, None]
    finally:
        (dirs["dspark"] / sts.CALIBRATION_FILE).unlink()


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"version": 2, "method": "sts", "temperatures": [1, 1, 1, 1]}', "calibration version 2 is not supported"),
    ('{"version": 1, "method": "platt", "temperatures": [1, 1, 1, 1]}', "method 'platt' unknown"),
    ('{"version": 1, "method": "sts", "temperatures": [1, 1, 1]}', "3 temperatures for a drafter of block size 4"),
    ('{"version": 1, "method": "sts", "temperatures": [1, -1, 1, 1]}', "finite numbers > 0"),
    ('{"version": 1, "method": "sts", "temperatures": [1, true, 1, 1]}', "finite numbers > 0"),
    ("[1, 1, 1, 1]", "expected a JSON object"),
])
def test_malformed_calibration_json_is_refused(exported, content, message):
    from dspark.export import load_drafter

    dirs, _ = exported
    path = dirs["dspark"] / sts.CALIBRATION_FILE
    path.write_text(content)
    try:
        with pytest.raises(ValueError, match=message) as info:
            load_drafter(dirs["dspark"])
        assert str(path) in str(info.value)
    finally:
        path.unlink()


def test_calibration_of_a_drafter_without_confidence_head_is_refused(exported):
    from dspark.export import load_drafter

    dirs, _ = exported
    path = sts.write_calibration(dirs["dflash"], [1.0] * BLOCK)
    try:
        with pytest.raises(ValueError, match="no confidence head"):
            load_drafter(dirs["dflash"])
    finally:
        path.unlink()
