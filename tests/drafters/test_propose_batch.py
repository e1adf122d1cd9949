"""``propose_batch`` drafts several rows of different context lengths in one call and gives each row what
``propose`` gives it alone (tokens exactly, probabilities and confidences to 1e-6, the same draws from the row's
own generator), for DSpark (vanilla and rnn heads, confidence head), DFlash and Eagle3 (full and pruned draft
vocabulary); also round after round with growing contexts (the per-row context cache), and bad input refused."""

from __future__ import annotations

import pytest
import torch
from tiny_drafters import LAYER_IDS, TINY_TARGET, H, V, make_drafter

from dspark.config import DrafterConfig, Eagle3Config
from dspark.drafters import build_drafter
from dspark.drafters.base import Drafter
from dspark.drafters.eagle3 import build_draft_vocab

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:draft vocab")]

LENGTHS = [9, 3, 17, 1]  # context lengths of the rows drafted together (the longest is not first)


def make_eagle3(draft_vocab_size: int = 0):
    """An Eagle3 drafter with random trainable tensors; pruned to a draft vocab fitted on skewed counts."""
    torch.manual_seed(0)
    cfg = DrafterConfig(algorithm="eagle3", block_size=5, eagle3=Eagle3Config(draft_vocab_size=draft_vocab_size))
    drafter = build_drafter(cfg, TINY_TARGET, LAYER_IDS, torch.randn(V, H), torch.randn(V, H) / H**0.5)
    if draft_vocab_size:
        counts_V = torch.randint(0, 50, (V,), generator=torch.Generator().manual_seed(1))
        drafter.set_draft_vocab(*build_draft_vocab(counts_V, draft_vocab_size))
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return drafter.eval()


DRAFTERS = {
    "dspark": lambda: make_drafter().eval(),
    "dspark_rnn": lambda: make_drafter(dspark={"markov_head_type": "rnn"}).eval(),
    "dflash": lambda: make_drafter(algorithm="dflash", dflash_layout=True).eval(),
    "eagle3": lambda: make_eagle3(),
    "eagle3_pruned": lambda: make_eagle3(draft_vocab_size=40),
}


def _rows(num_rows: int = len(LENGTHS), max_len: int = 40, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    contexts = [torch.randn(max_len, len(LAYER_IDS), H, generator=g) for _ in range(num_rows)]
    ids = [torch.randint(0, V, (max_len,), generator=g) for _ in range(num_rows)]
    return contexts, ids


def _alone(drafter, context_TLH, ids_T, anchor, temperature, generator):
    """The row drafted by itself with an empty cache."""
    drafter.reset_context_cache()
    extra = {"context_ids_T": ids_T} if drafter.needs_context_ids else {}
    return drafter.propose(context_TLH, anchor, temperature=temperature, generator=generator, **extra)


def _assert_same(batched, alone):
    assert torch.equal(batched.tokens_K, alone.tokens_K)
    torch.testing.assert_close(batched.probs_KV, alone.probs_KV, rtol=0, atol=1e-6)
    assert (batched.confidence_K is None) == (alone.confidence_K is None)
    if alone.confidence_K is not None:
        torch.testing.assert_close(batched.confidence_K, alone.confidence_K, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("kind", list(DRAFTERS))
def test_batched_proposals_equal_per_row_proposals(kind, temperature):
    drafter = DRAFTERS[kind]()
    contexts, ids = _rows()
    anchors = [7, 250, 31, 4]
    extra = {"context_ids": [i[:n] for i, n in zip(ids, LENGTHS)]} if kind.startswith("eagle3") else {}
    generators = [torch.Generator().manual_seed(100 + b) for b in range(len(LENGTHS))]
    drafter.reset_context_cache()
    batched = drafter.propose_batch([c[:n] for c, n in zip(contexts, LENGTHS)], anchors, temperature=temperature,
                                    generators=generators, **extra)
    assert len(batched) == len(LENGTHS)
    for b, n in enumerate(LENGTHS):
        generator = torch.Generator().manual_seed(100 + b)
        alone = _alone(drafter, contexts[b][:n], ids[b][:n], anchors[b], temperature, generator)
        _assert_same(batched[b], alone)
        # The row drew exactly as often from its own generator as alone.
        assert torch.equal(generators[b].get_state(), generator.get_state())
    if kind == "eagle3_pruned":
        assert all(bool(drafter.t2d[p.tokens_K].all()) and torch.all(p.probs_KV[:, ~drafter.t2d] == 0)
                   for p in batched)
    # Rows are independent: the same proposals in another row order (a different longest-row position).
    order = [2, 0, 3, 1]
    generators = [torch.Generator().manual_seed(100 + b) for b in order]
    extra = {"context_ids": [ids[b][: LENGTHS[b]] for b in order]} if extra else {}
    drafter.reset_context_cache()
    shuffled = drafter.propose_batch([contexts[b][: LENGTHS[b]] for b in order], [anchors[b] for b in order],
                                     temperature=temperature, generators=generators, **extra)
    for proposal, b in zip(shuffled, order):
        _assert_same(proposal, batched[b])


@pytest.mark.parametrize("kind", ["dspark", "eagle3_pruned"])
def test_batched_rounds_with_growing_contexts_match_cold_proposals(kind):
    # Decoding-like rounds: each row's context grows by a different amount (one row restarts shorter, one row
    # leaves), so the per-row cache reuses a prefix of a different length in every row.
    drafter = DRAFTERS[kind]()
    contexts, ids = _rows(num_rows=3)
    schedule = [[5, 2, 11], [8, 2, 14], [12, 6, 4], [20, 9]]
    for step, lengths in enumerate(schedule):
        rows = range(len(lengths))
        extra = {"context_ids": [ids[b][:n] for b, n in zip(rows, lengths)]} if kind.startswith("eagle3") else {}
        batched = drafter.propose_batch([contexts[b][:n] for b, n in zip(rows, lengths)], [step + 1] * len(lengths),
                                        temperature=1.0, generators=[torch.Generator().manual_seed(step + 10 * b)
                                                                     for b in rows], **extra)
        cache = drafter._prefix_cache
        for b, n in zip(rows, lengths):
            alone = _alone(drafter, contexts[b][:n], ids[b][:n], step + 1, 1.0,
                           torch.Generator().manual_seed(step + 10 * b))
            _assert_same(batched[b], alone)
        drafter._prefix_cache = cache  # the next round continues from the batched call's cache


def test_default_propose_batch_drafts_row_by_row():
    # A drafter implementing only ``propose`` gets a correct ``propose_batch`` from the base class.
    class OnlyPropose(Drafter):
        algorithm = "only_propose"

        def forward_loss(self, batch, generator=None):
            raise NotImplementedError

        def propose(self, context_TLH, anchor_id, *, temperature, generator=None):
            return real.propose(context_TLH, anchor_id, temperature=temperature, generator=generator)

    real = make_drafter().eval()
    contexts, _ = _rows(num_rows=2)
    batched = OnlyPropose().propose_batch([contexts[0][:4], contexts[1][:9]], [3, 5], temperature=1.0,
                                          generators=[torch.Generator().manual_seed(b) for b in range(2)])
    for b, n in enumerate([4, 9]):
        _assert_same(batched[b], _alone(real, contexts[b][:n], None, [3, 5][b], 1.0, torch.Generator().manual_seed(b)))


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_bad_batches_are_refused(kind):
    drafter = DRAFTERS[kind]()
    contexts, ids = _rows(num_rows=2)
    extra = {"context_ids": [ids[0][:4], ids[1][:6]]} if kind == "eagle3" else {}
    with pytest.raises(ValueError, match="one of each per row"):
        drafter.propose_batch([contexts[0][:4], contexts[1][:6]], [1], temperature=1.0, generators=[None, None],
                              **extra)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        drafter.propose_batch([contexts[0][:4]], [1], temperature=-1.0, generators=[None], **extra)
    if kind == "eagle3":
        with pytest.raises(ValueError, match="context_ids_T"):
            drafter.propose_batch([contexts[0][:4], contexts[1][:6]], [1, 2], temperature=1.0,
                                  generators=[None, None], context_ids=[ids[0][:4], ids[1][:5]])
