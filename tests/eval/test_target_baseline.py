"""``NoDrafts``: speculative decoding with a drafter that proposes nothing is plain target decoding (the tokens/s
baseline ``dspark eval`` reports next to each drafter), batched or not, greedy or sampled."""

from __future__ import annotations

import pytest
import torch

from dspark.config import TargetConfig
from dspark.eval.specdec import NoDrafts, evaluate, prompt_seed, speculative_generate_batch, target_generate
from dspark.targets import load_target

PROMPTS = [[1, 504, 2683, 314, 253], [1, 9690, 28, 44], [1, 17, 2000, 31, 7, 900, 12]]


@pytest.fixture(scope="module")
def target(tiny_llama_dir, one_thread):
    return load_target(TargetConfig(name_or_path=str(tiny_llama_dir), layer_ids=[-1, 0, 2]))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_no_drafts_decodes_exactly_the_target(target, temperature, batch_size):
    def generators():
        return [torch.Generator().manual_seed(prompt_seed(0, i)) for i in range(len(PROMPTS))]

    results = speculative_generate_batch(target, NoDrafts(target), PROMPTS, max_new_tokens=9,
                                         temperature=temperature, generators=generators(), batch_size=batch_size)
    expected = [target_generate(target, p, max_new_tokens=9, temperature=temperature, generator=g)
                for p, g in zip(PROMPTS, generators())]
    assert [r.tokens for r in results] == expected
    assert all(set(r.accepted) == {0} and set(r.proposed) == {0} for r in results)


def test_eval_report_carries_the_target_baseline(target):
    report = evaluate(target, NoDrafts(target), PROMPTS, max_new_tokens=5, temperature=0.0, seed=0, batch_size=3)
    assert report.tau == 1.0 and report.generated_tokens == 15 and report.tokens_per_s > 0
    report.target_tokens_per_s = report.tokens_per_s / 2
    assert report.to_dict()["speedup_vs_target"] == pytest.approx(2.0)
