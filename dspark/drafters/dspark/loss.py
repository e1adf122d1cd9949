"""Chunked vocabulary losses (CE and L1 between draft and target distributions) with a hand-written gradient.

Legend: N supervised slots, H hidden size, R Markov rank, V vocab, C rows per chunk.

Draft logits are ``z = lm_head(h) + W2 u`` and target probabilities ``softmax(lm_head(final))``. Both are
``[N, V]``; with V = 49152 and thousands of slots that is gigabytes, so the forward walks over row chunks and
computes the gradient with respect to ``z`` in closed form while the chunk is live (like fused linear
cross-entropy kernels), keeping only ``[N, H]``, ``[N, R]`` and ``[V, R]`` gradients. No logits are kept for
backward and nothing is recomputed.

Per row n with coefficients ``a_n`` (CE) and ``b_n`` (L1):
    loss_n = a_n * CE_n + b_n * L1_n,   CE_n = -log p[label],   L1_n = sum_v |p_v - t_v|
    dCE/dz = p - onehot(label),         dL1/dz = p * (s - <s, p>),   s = sign(p - t)

With a final-logit softcap c (Gemma4) both LM-head logits are capped, ``z = c tanh(lm_head(h) / c) + W2 u`` and
``t = softmax(c tanh(lm_head(final) / c))``, and the gradient reaching ``h`` is ``dL/dz * (1 - tanh^2)``.
"""

from __future__ import annotations

import torch


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: about 16M logits (64 MB in fp32) per live ``[C, V]`` temporary."""
    return max(16, min(4096, (1 << 24) // max(vocab_size, 1)))


class _ChunkedVocabLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NH, u_NR, w2_VR, lm_head_VH, final_NH, labels_N, coef_ce_N, coef_l1_N, chunk_rows, softcap):
        N = h_NH.shape[0]
        lm_VH = lm_head_VH.float()
        w2f_VR = w2_VR.float() if w2_VR is not None else None
        need_grad = any(ctx.needs_input_grad[:3])
        use_l1_grad = bool((coef_l1_N != 0).any())
        ce_N = torch.empty(N, dtype=torch.float32, device=h_NH.device)
        l1_N = torch.empty(N, dtype=torch.float32, device=h_NH.device)
        grad_h_NH = grad_u_NR = grad_w2_VR = None
        if need_grad:
            grad_h_NH = torch.zeros(h_NH.shape, dtype=torch.float32, device=h_NH.device)
            if u_NR is not None:
                grad_u_NR = torch.zeros(u_NR.shape, dtype=torch.float32, device=h_NH.device)
                grad_w2_VR = torch.zeros_like(w2f_VR)
        for start in range(0, N, chunk_rows):
            rows = slice(start, min(start + chunk_rows, N))
            z_CV = h_NH[rows].float() @ lm_VH.T
            if softcap:
                tanh_CV = torch.tanh(z_CV / softcap)
                z_CV = tanh_CV * softcap
            if u_NR is not None:
                u_CR = u_NR[rows].float()
                z_CV = z_CV + u_CR @ w2f_VR.T
            logp_CV = z_CV.log_softmax(dim=-1)
            del z_CV
            p_CV = logp_CV.exp()
            labels_C1 = labels_N[rows].unsqueeze(1)
            ce_N[rows] = -logp_CV.gather(1, labels_C1).squeeze(1)
            del logp_CV
            target_CV = final_NH[rows].float() @ lm_VH.T
            if softcap:
                target_CV = torch.tanh(target_CV / softcap) * softcap
            diff_CV = p_CV - target_CV.softmax(dim=-1)
            del target_CV
            l1_N[rows] = diff_CV.abs().sum(dim=-1)
            if not need_grad:
                continue
            coef_ce_C1 = coef_ce_N[rows].float().unsqueeze(1)
            grad_CV = p_CV * coef_ce_C1
            grad_CV.scatter_add_(1, labels_C1, -coef_ce_C1)
            if use_l1_grad:
                sign_CV = diff_CV.sign_()
                sign_CV -= (p_CV * sign_CV).sum(dim=-1, keepdim=True)
                grad_CV += p_CV * sign_CV * coef_l1_N[rows].float().unsqueeze(1)
            if u_NR is not None:
                grad_u_NR[rows] = grad_CV @ w2f_VR
                grad_w2_VR += grad_CV.T @ u_CR
            if softcap:
                grad_CV *= 1.0 - tanh_CV.square_()
            grad_h_NH[rows] = grad_CV @ lm_VH
        loss = (coef_ce_N.float() * ce_N).sum() + (coef_l1_N.float() * l1_N).sum()
        ctx.mark_non_differentiable(ce_N, l1_N)
        ctx.grads = (grad_h_NH, grad_u_NR, grad_w2_VR)
        ctx.dtypes = (h_NH.dtype, u_NR.dtype if u_NR is not None else None, w2_VR.dtype if w2_VR is not None else None)
        return loss, ce_N, l1_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_l1):
        grads = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):
            grads.append(None if g is None else (g * grad_loss).to(dtype))
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None)


def chunked_vocab_loss(h_NH: torch.Tensor, u_NR: torch.Tensor | None, w2_VR: torch.Tensor | None,
                       lm_head_VH: torch.Tensor, final_NH: torch.Tensor, labels_N: torch.Tensor,
                       coef_ce_N: torch.Tensor, coef_l1_N: torch.Tensor, chunk_rows: int, softcap: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum_n a_n CE_n + b_n L1_n, CE_N, L1_N)``; the sum is differentiable w.r.t. ``h``, ``u`` and ``w2``.
    ``softcap``: the target's final-logit softcap (0 = none), applied to draft and target LM-head logits.

    ``CE_N`` and ``L1_N`` (fp32, detached) are per-row values for logging and the confidence label.
    """
    if not torch.is_grad_enabled():  # evaluation: skip the in-forward gradient work
        h_NH = h_NH.detach()
        u_NR = u_NR.detach() if u_NR is not None else None
        w2_VR = w2_VR.detach() if w2_VR is not None else None
    return _ChunkedVocabLoss.apply(h_NH, u_NR, w2_VR, lm_head_VH, final_NH, labels_N, coef_ce_N.detach(),
                                   coef_l1_N.detach(), chunk_rows, float(softcap))
