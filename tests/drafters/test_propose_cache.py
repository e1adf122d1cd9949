"""The decoding-time context cache of DSparkDrafter.propose gives the same proposals as a cold call."""

import pytest
import torch
from tiny_drafters import LAYER_IDS, H, make_drafter

pytestmark = pytest.mark.usefixtures("one_thread")


def _cold(drafter, context_TLH, anchor, seed, temperature):
    drafter.reset_context_cache()
    return drafter.propose(context_TLH, anchor, temperature=temperature,
                           generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_growing_context_matches_cold_proposals(temperature):
    drafter = make_drafter().eval()
    context_TLH = torch.randn(40, len(LAYER_IDS), H, generator=torch.Generator().manual_seed(3))
    for step, length in enumerate([10, 13, 13, 20, 8, 40]):  # grows, repeats, and restarts shorter
        warm = drafter.propose(context_TLH[:length], 7, temperature=temperature,
                               generator=torch.Generator().manual_seed(step))
        cold = _cold(drafter, context_TLH[:length], 7, step, temperature)
        assert torch.equal(warm.tokens_K, cold.tokens_K)
        torch.testing.assert_close(warm.probs_KV, cold.probs_KV, rtol=0, atol=1e-6)


def test_changed_context_or_weights_invalidate_the_cache():
    drafter = make_drafter().eval()
    context_TLH = torch.randn(30, len(LAYER_IDS), H, generator=torch.Generator().manual_seed(4))
    drafter.propose(context_TLH, 5, temperature=0.0)
    edited = context_TLH.clone()
    edited[3] += 1.0  # an earlier row changed: nothing may be reused
    warm = drafter.propose(edited, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    cold = _cold(drafter, edited, 5, 0, 1.0)
    torch.testing.assert_close(warm.probs_KV, cold.probs_KV, rtol=0, atol=1e-6)

    drafter.propose(context_TLH, 5, temperature=0.0)
    with torch.no_grad():
        # An in-place update, as an optimizer step does (not a uniform scale: hidden_norm would undo that).
        drafter.fc.weight.add_(0.05 * torch.randn(drafter.fc.weight.shape, generator=torch.Generator().manual_seed(5)))
    warm = drafter.propose(context_TLH, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    cold = _cold(drafter, context_TLH, 5, 0, 1.0)
    torch.testing.assert_close(warm.probs_KV, cold.probs_KV, rtol=0, atol=1e-6)
