"""Chunked vocabulary losses (CE and L1 between draft and target distributions) with a hand-written gradient.

Legend: N supervised slots, H hidden size, R Markov rank, D = H + R, V vocab, C rows per chunk.

Draft logits are ``z = lm_head(h) + W2 u`` and target probabilities ``softmax(lm_head(final))``. Both are
``[N, V]``; with V = 49152 and thousands of slots that is gigabytes, so the forward walks over row chunks and
computes the gradient with respect to ``z`` in closed form while the chunk is live (like fused linear
cross-entropy kernels), keeping only ``[N, H]``, ``[N, R]`` and ``[V, R]`` gradients. No logits are kept for
backward and nothing is recomputed. Per chunk that is four products over the vocabulary: the draft logits (LM
head and Markov bias folded into one, see ``_VocabWeights``), the target logits, the input gradients (folded
likewise) and W2's gradient.

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
    def forward(ctx, h_NH, u_NR, w2_VR, lm_head_VH, final_NH, labels_N, coef_ce_N, coef_l1_N, chunk_rows,
                fold_markov, softcap):
        N = h_NH.shape[0]
        with_markov = u_NR is not None
        weights = _VocabWeights(lm_head_VH, w2_VR, fold_markov, softcap)
        need_grad = any(ctx.needs_input_grad[:3])
        use_l1_grad = bool((coef_l1_N != 0).any())
        ce_N = torch.empty(N, dtype=torch.float32, device=h_NH.device)
        l1_N = torch.empty(N, dtype=torch.float32, device=h_NH.device)
        grad_h_NH = grad_u_NR = grad_w2_VR = None
        if need_grad:
            grad_h_NH = torch.empty(h_NH.shape, dtype=torch.float32, device=h_NH.device)
            if with_markov:
                grad_u_NR = torch.empty(u_NR.shape, dtype=torch.float32, device=h_NH.device)
                grad_w2_VR = torch.zeros(w2_VR.shape, dtype=torch.float32, device=h_NH.device)
        for start in range(0, N, chunk_rows):
            rows = slice(start, min(start + chunk_rows, N))
            h_CH = h_NH[rows].float()
            u_CR = u_NR[rows].float() if with_markov else None
            ce_N[rows], l1_N[rows], grad_CV = _chunk_loss(
                weights.draft_logits(h_CH, u_CR), weights.target_logits(final_NH[rows].float()), labels_N[rows],
                coef_ce_N[rows], coef_l1_N[rows], need_grad, use_l1_grad)
            if not need_grad:
                continue
            if with_markov:  # before input_grads, which may scale grad_CV in place (softcap)
                grad_w2_VR.addmm_(grad_CV.T, u_CR)
            grad_h_NH[rows], grad_u_CR = weights.input_grads(grad_CV)
            if with_markov:
                grad_u_NR[rows] = grad_u_CR
        loss = (coef_ce_N.float() * ce_N).sum() + (coef_l1_N.float() * l1_N).sum()
        ctx.mark_non_differentiable(ce_N, l1_N)
        ctx.grads = (grad_h_NH, grad_u_NR, grad_w2_VR)
        ctx.dtypes = (h_NH.dtype, u_NR.dtype if with_markov else None, w2_VR.dtype if with_markov else None)
        return loss, ce_N, l1_N

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_l1):
        grads = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):
            grads.append(None if g is None else (g * grad_loss).to(dtype))
        ctx.grads = None
        return (*grads, *[None] * 8)  # lm_head .. softcap: frozen or not tensors


class _VocabWeights:
    """The vocabulary products of the draft logits ``z = h @ lm_head^T + u @ W2^T`` and of their input gradients.

    Folded (``fold=True`` with a Markov head): ``z = [h ; u] @ [lm_head ; W2]^T`` and ``[dh ; du] = dz @ [lm_head ;
    W2]``, one (H + R)-wide product each way instead of two passes over the vocabulary; the ``[V, H + R]`` fp32
    copy is made once per loss call, not per chunk, and replaces the fp32 copy of the LM head. Unfolded, the two
    products stay apart: a transform applied to the LM-head logits alone (e.g. a softcap) must sit between them.
    """

    def __init__(self, lm_head_VH: torch.Tensor, w2_VR: torch.Tensor | None, fold: bool, softcap: float = 0.0):
        self.w_VD = None
        self.softcap = softcap
        self._tanh_CV = None  # the current chunk's tanh of the capped LM-head logits (softcap backward)
        if fold and w2_VR is not None and not softcap:  # a softcap acts on the LM-head logits alone
            # One fp32 buffer; lm_head and W2 are column views of it (a strided view multiplies without a copy).
            V, H = lm_head_VH.shape
            self.w_VD = torch.empty((V, H + w2_VR.shape[1]), dtype=torch.float32, device=lm_head_VH.device)
            self.w_VD[:, :H] = lm_head_VH
            self.w_VD[:, H:] = w2_VR
            self.lm_VH, self.w2_VR = self.w_VD[:, :H], self.w_VD[:, H:]
        else:
            self.lm_VH = lm_head_VH.float()
            self.w2_VR = w2_VR.float() if w2_VR is not None else None

    def target_logits(self, final_CH: torch.Tensor) -> torch.Tensor:
        z_CV = final_CH @ self.lm_VH.T
        return torch.tanh(z_CV.div_(self.softcap)).mul_(self.softcap) if self.softcap else z_CV

    def draft_logits(self, h_CH: torch.Tensor, u_CR: torch.Tensor | None) -> torch.Tensor:
        if self.w_VD is not None:
            return torch.cat([h_CH, u_CR], dim=1) @ self.w_VD.T
        z_CV = h_CH @ self.lm_VH.T
        if self.softcap:  # z = c tanh(h W^T / c) + u W2^T; the tanh is kept for the backward
            self._tanh_CV = torch.tanh(z_CV.div_(self.softcap))
            z_CV = self._tanh_CV * self.softcap
        return z_CV if u_CR is None else z_CV.addmm_(u_CR, self.w2_VR.T)

    def input_grads(self, grad_CV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(dloss/dh, dloss/du)`` of a chunk from ``dloss/dz`` (scaled in place by the softcap's derivative)."""
        if self.w_VD is not None:
            grad_CD = grad_CV @ self.w_VD
            H = self.lm_VH.shape[1]
            return grad_CD[:, :H], grad_CD[:, H:]
        grad_u_CR = grad_CV @ self.w2_VR if self.w2_VR is not None else None
        if self.softcap:  # d(c tanh(x / c))/dx = 1 - tanh^2
            grad_CV.mul_(self._tanh_CV.square_().neg_().add_(1.0))
            self._tanh_CV = None
        return grad_CV @ self.lm_VH, grad_u_CR


def _chunk_loss(z_CV, target_logits_CV, labels_C, coef_ce_C, coef_l1_C, need_grad: bool, use_l1_grad: bool):
    """One chunk's ``(CE, L1, dloss/dz)`` from draft logits ``z`` and target logits (both consumed).

    ``p`` overwrites ``log p`` and ``p - t`` the target probabilities, and the gradient reuses ``sign(p - t)``, so
    a chunk holds at most three ``[C, V]`` tensors at once and allocates no more.
    """
    labels_C1 = labels_C.unsqueeze(1)
    logp_CV = z_CV.log_softmax(dim=-1)  # one fused kernel (logsumexp is several passes on CPU)
    del z_CV
    ce_C = -logp_CV.gather(1, labels_C1).squeeze(1)
    p_CV = logp_CV.exp_()
    t_CV = target_logits_CV.softmax(dim=-1)
    del target_logits_CV
    diff_CV = torch.sub(p_CV, t_CV, out=t_CV)
    l1_C = diff_CV.abs().sum(dim=-1)
    if not need_grad:
        return ce_C, l1_C, None
    # dloss/dz = a (p - onehot) + b p (s - <s, p>) = p * (a + b (s - <s, p>)) - a onehot
    coef_ce_C1 = coef_ce_C.float().unsqueeze(1)
    if use_l1_grad:
        sign_CV = diff_CV.sign_()
        sign_CV -= (p_CV.unsqueeze(1) @ sign_CV.unsqueeze(2)).squeeze(2)  # <s, p> per row, no [C, V] temporary
        sign_CV *= coef_l1_C.float().unsqueeze(1)
        sign_CV += coef_ce_C1
        grad_CV = sign_CV.mul_(p_CV)
    else:
        grad_CV = p_CV.mul_(coef_ce_C1)
    grad_CV.scatter_add_(1, labels_C1, -coef_ce_C1)
    return ce_C, l1_C, grad_CV


def chunked_vocab_loss(h_NH: torch.Tensor, u_NR: torch.Tensor | None, w2_VR: torch.Tensor | None,
                       lm_head_VH: torch.Tensor, final_NH: torch.Tensor, labels_N: torch.Tensor,
                       coef_ce_N: torch.Tensor, coef_l1_N: torch.Tensor, chunk_rows: int, softcap: float = 0.0,
                       fold_markov: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum_n a_n CE_n + b_n L1_n, CE_N, L1_N)``; the sum is differentiable w.r.t. ``h``, ``u`` and ``w2``.
    ``softcap``: the target's final-logit softcap (0 = none), applied to draft and target LM-head logits.

    ``fold_markov`` computes the LM-head and Markov-bias products as one (``_VocabWeights``); pass False when
    something must act on the LM-head logits before the bias is added.

    ``CE_N`` and ``L1_N`` (fp32, detached) are per-row values for logging and the confidence label.
    """
    if not torch.is_grad_enabled():  # evaluation: skip the in-forward gradient work
        h_NH = h_NH.detach()
        u_NR = u_NR.detach() if u_NR is not None else None
        w2_VR = w2_VR.detach() if w2_VR is not None else None
    return _ChunkedVocabLoss.apply(h_NH, u_NR, w2_VR, lm_head_VH, final_NH, labels_N, coef_ce_N.detach(),
                                   coef_l1_N.detach(), chunk_rows, fold_markov, float(softcap))
