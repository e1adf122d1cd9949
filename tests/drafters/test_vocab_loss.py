"""The chunked vocabulary loss with the LM-head and Markov-bias products folded into one, against the loss as it
was before the fold (``benchmarks/drafter_step.py``'s ``reference_chunked_vocab_loss``): equal loss and
gradients in fp32.

Legend: N rows, H hidden, R Markov rank, V vocab.
"""

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_drafters import make_batch, make_drafter

from dspark.drafters.dspark.loss import chunked_vocab_loss

pytestmark = pytest.mark.usefixtures("one_thread")

_spec = importlib.util.spec_from_file_location(
    "drafter_step_benchmark", Path(__file__).resolve().parents[2] / "benchmarks" / "drafter_step.py")
drafter_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drafter_step)


def _inputs(markov: bool, l1: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    N, H, R, V = 23, 16, 5, 97
    h_NH = torch.randn(N, H, generator=g, requires_grad=True)
    u_NR = torch.randn(N, R, generator=g, requires_grad=True) if markov else None
    w2_VR = (torch.randn(V, R, generator=g) * 0.3).requires_grad_() if markov else None
    coef_ce_N = torch.rand(N, generator=g)
    coef_l1_N = torch.rand(N, generator=g) if l1 else torch.zeros(N)
    return dict(h_NH=h_NH, u_NR=u_NR, w2_VR=w2_VR, lm_head_VH=torch.randn(V, H, generator=g) * 0.3,
                final_NH=torch.randn(N, H, generator=g), labels_N=torch.randint(0, V, (N,), generator=g),
                coef_ce_N=coef_ce_N, coef_l1_N=coef_l1_N, chunk_rows=7)


def _run(fn, args, **kw):
    loss, ce_N, l1_N = fn(**args, **kw)
    leaves = [args[k] for k in ("h_NH", "u_NR", "w2_VR") if args[k] is not None]
    grads = torch.autograd.grad(loss * 1.7, leaves)  # a non-unit upstream gradient
    return [loss, ce_N, l1_N, *grads]


@pytest.mark.parametrize("markov,l1", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("fold", [True, False])
def test_loss_and_gradients_equal_the_pre_fold_loss(markov, l1, fold):
    args = _inputs(markov, l1)
    expected = _run(drafter_step.reference_chunked_vocab_loss, args)
    got = _run(chunked_vocab_loss, args, fold_markov=fold)
    assert len(got) == len(expected) == 3 + 1 + 2 * markov
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6 * e.abs().max().item())


def test_folding_is_used_and_is_one_product_each_way(monkeypatch):
    """With a Markov head the folded path multiplies by the [V, H + R] weight both ways and never by W2 alone;
    unfolded it never builds the [V, H + R] weight."""
    widths = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        widths.append(tuple(b.shape))
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    args = _inputs(markov=True, l1=True)
    _run(chunked_vocab_loss, args, fold_markov=True)
    assert (16 + 5, 97) in widths and (97, 16 + 5) in widths and (5, 97) not in widths
    widths.clear()
    _run(chunked_vocab_loss, args, fold_markov=False)
    assert (16 + 5, 97) not in widths and (97, 16 + 5) not in widths and (97, 5) in widths


def test_drafter_step_with_the_folded_loss_equals_the_reference_step():
    batch = make_batch()
    grads = []
    for reference in (False, True):
        d = make_drafter()
        with drafter_step.reference_loss() if reference else contextlib.nullcontext():
            out = d.forward_loss(batch, torch.Generator().manual_seed(0))
        out.numerator.backward()
        grads.append((out.numerator.detach(), {n: p.grad.clone() for n, p in d.named_parameters()
                                               if p.grad is not None}))
    (loss, g), (ref_loss, ref_g) = grads
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert g.keys() == ref_g.keys() and "markov_head.markov_w2.weight" in g
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-6, atol=1e-6 * ref_g[name].abs().max().item())
