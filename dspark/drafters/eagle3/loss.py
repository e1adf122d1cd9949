"""Chunked soft cross-entropy against the target's distribution, with a closed-form gradient (Eagle3 loss).

Legend: N supervised rows, H hidden size, V target vocab, W draft vocab (= V unless pruned), C rows per chunk.

Draft logits ``z = h @ lm_draft^T`` ([N, W]) and the target distribution ``t = softmax(final @ lm_head^T)``
([N, V]) are both gigabytes at real sizes, so the forward walks over row chunks and writes ``dL/dh`` while a
chunk is live; nothing ``[N, W]`` is kept for backward. With a pruned draft vocabulary the training target is
``t`` restricted to the draft ids and renormalised (the draft cannot put mass elsewhere), while the acceptance
estimate ``1 - TV`` is measured against the full ``t`` (mass outside the draft vocab is always rejected).

Per row n with coefficient ``a_n``:  loss_n = a_n * -sum_w t'_w log p_w,  dloss/dz = a_n (p - t').
With a final-logit softcap c (Gemma4) both logits are capped, ``z = c tanh(h @ lm_draft^T / c)`` and the target's
likewise, and the gradient picks up the cap's derivative ``1 - tanh^2``.
"""

from __future__ import annotations

import torch


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NH, lm_draft_WH, lm_head_VH, final_NH, draft_ids_W, coef_N, chunk_rows, softcap):
        N = h_NH.shape[0]
        lm_draft = lm_draft_WH.float()
        lm_full = lm_head_VH.float()
        ce_N = torch.empty(N, dtype=torch.float32, device=h_NH.device)
        accept_N = torch.empty(N, dtype=torch.float32, device=h_NH.device)
        grad_h_NH = torch.zeros(h_NH.shape, dtype=torch.float32, device=h_NH.device) if ctx.needs_input_grad[0] \
            else None
        for start in range(0, N, chunk_rows):
            rows = slice(start, min(start + chunk_rows, N))
            z_CW = h_NH[rows].float() @ lm_draft.T
            tanh_CW = None
            if softcap:  # the tanh is kept for the gradient
                tanh_CW = torch.tanh(z_CW / softcap)
                z_CW = tanh_CW * softcap
            logp_CW = z_CW.log_softmax(dim=-1)
            del z_CW
            p_CW = logp_CW.exp()
            target_logits_CV = final_NH[rows].float() @ lm_full.T
            if softcap:
                target_logits_CV = torch.tanh(target_logits_CV / softcap) * softcap
            if draft_ids_W is None:
                t_CW = target_logits_CV.softmax(dim=-1)
                t_full_in_draft_CW = t_CW
            else:
                t_full_in_draft_CW = target_logits_CV.softmax(dim=-1)[:, draft_ids_W]
                t_CW = target_logits_CV[:, draft_ids_W].softmax(dim=-1)
            del target_logits_CV
            ce_N[rows] = -(t_CW * logp_CW).sum(dim=-1)
            # TV over the target vocab: inside the draft vocab |p - t|, outside it the draft has 0 and t its mass.
            outside_C = (1.0 - t_full_in_draft_CW.sum(dim=-1)).clamp_min(0.0)
            tv_C = 0.5 * ((p_CW - t_full_in_draft_CW).abs().sum(dim=-1) + outside_C)
            accept_N[rows] = 1.0 - tv_C
            if grad_h_NH is not None:
                grad_z_CW = (p_CW - t_CW) * coef_N[rows].float().unsqueeze(1)
                if tanh_CW is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2
                    grad_z_CW = grad_z_CW * (1.0 - tanh_CW.square())
                grad_h_NH[rows] = grad_z_CW @ lm_draft
        ctx.mark_non_differentiable(ce_N, accept_N)
        ctx.grad_h = grad_h_NH
        ctx.h_dtype = h_NH.dtype
        return (coef_N.float() * ce_N).sum(), ce_N, accept_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_accept):
        grad_h = ctx.grad_h
        ctx.grad_h = None
        return (None if grad_h is None else (grad_h * grad_loss).to(ctx.h_dtype)), *[None] * 7


def soft_cross_entropy(h_NH: torch.Tensor, lm_draft_WH: torch.Tensor, lm_head_VH: torch.Tensor,
                       final_NH: torch.Tensor, draft_ids_W: torch.Tensor | None, coef_N: torch.Tensor,
                       chunk_rows: int, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum_n a_n CE_n, CE_N, accept_N)``: the sum is differentiable w.r.t. ``h`` only (both heads are frozen).

    ``draft_ids_W`` lists the target id of every draft id (None = the full vocabulary, ``lm_draft = lm_head``).
    ``accept_N = 1 - TV(p_draft, p_target)`` in the target vocab (detached, for logging). ``softcap``: the target's
    final-logit softcap (0 = none), applied to draft and target logits.
    """
    if not torch.is_grad_enabled():
        h_NH = h_NH.detach()
    return _SoftCrossEntropy.apply(h_NH, lm_draft_WH.detach(), lm_head_VH.detach(), final_NH.detach(), draft_ids_W,
                                   coef_N.detach(), chunk_rows, float(softcap))
