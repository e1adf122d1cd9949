"""DSpark's sequential heads: a low-rank vocabulary bias conditioned on the previous token, and the confidence head.

Legend: X any leading dims (e.g. B, A), K block size, H hidden size, R Markov rank, V vocab.

Every head variant produces a rank-R vector ``u_k``; the logit bias is ``B_k = markov_w2(u_k)`` (``W2: R -> V``),
so the loss can apply ``W2`` chunk by chunk without materialising ``[positions x V]`` (see ``loss.py``).
``e_k = markov_w1[x_{k-1}]`` is the embedding of the previous token (the anchor at slot 1).

- vanilla (Markov): ``u_k = e_k``.
- gated: ``u_k = sigmoid(gate_proj([h_k ; e_k])) * e_k``: the draft hidden state decides, per rank
  direction, how much of the bigram bias to apply (``gate_proj: H + R -> R`` with bias).
- rnn: ``z_k = [s_{k-1} ; e_k ; h_k]``, ``[g, c, o] = joint_proj(z_k)`` (``2R + H -> 3R`` with bias, split in
  this order), ``s_k = sigmoid(g) * s_{k-1} + (1 - sigmoid(g)) * tanh(c)``, ``u_k = tanh(o)``, ``s_0 = 0``.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_TYPES = ("vanilla", "gated", "rnn")


class MarkovHead(nn.Module):
    """Previous-token-conditioned logit bias of rank ``rank`` (DESIGN section 4, "DSpark sequential head")."""

    def __init__(self, kind: str, vocab_size: int, rank: int, hidden_size: int):
        super().__init__()
        if kind not in HEAD_TYPES:
            raise ValueError(f"markov_head_type must be one of {', '.join(HEAD_TYPES)}, got {kind!r}")
        if rank < 1:
            raise ValueError(f"markov_rank must be >= 1 for a Markov head, got {rank}")
        self.kind, self.rank = kind, rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)
        if kind == "gated":
            self.gate_proj = nn.Linear(hidden_size + rank, rank)
        elif kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def step(self, h_XH: torch.Tensor, prev_X: torch.Tensor, state_XR: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One slot: returns ``(u_XR, e_XR, new_state_XR)``; ``state`` is only used (and returned) by "rnn"."""
        e_XR = self.markov_w1(prev_X)
        if self.kind == "vanilla":
            return e_XR, e_XR, None
        if self.kind == "gated":
            gate_XR = torch.sigmoid(self.gate_proj(torch.cat([h_XH, e_XR], dim=-1)))
            return gate_XR * e_XR, e_XR, None
        if state_XR is None:
            state_XR = e_XR.new_zeros(e_XR.shape)
        g, c, o = self.joint_proj(torch.cat([state_XR, e_XR, h_XH], dim=-1)).split(self.rank, dim=-1)
        keep = torch.sigmoid(g)
        new_state_XR = keep * state_XR + (1 - keep) * torch.tanh(c)
        return torch.tanh(o), e_XR, new_state_XR

    def teacher_forced(self, h_XKH: torch.Tensor, prev_XK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u_XKR, e_XKR)`` for a whole block given the ground-truth previous tokens."""
        if self.kind != "rnn":
            u_XKR, e_XKR, _ = self.step(h_XKH, prev_XK, None)
            return u_XKR, e_XKR
        state, us, es = None, [], []
        for k in range(h_XKH.shape[-2]):  # the recurrence runs over the K slots, vectorised over blocks
            u, e, state = self.step(h_XKH[..., k, :], prev_XK[..., k], state)
            us.append(u)
            es.append(e)
        return torch.stack(us, dim=-2), torch.stack(es, dim=-2)


class ConfidenceHead(nn.Module):
    """``c_k = sigmoid(proj([h_k ; markov_w1[x_{k-1}]]))`` (or ``proj(h_k)`` without a Markov head); returns logits.

    ``temperature_K`` holds the Sequential Temperature Scaling temperatures (``dspark.eval.sts``) that decoding
    applies as ``sigmoid(logit_k / T_k)`` (``probability``): ones, i.e. no change, until ``load_drafter`` reads a
    ``calibration.json``. A non-persistent buffer, so checkpoints and exported weights never hold it. Training uses
    the raw logits.
    """

    def __init__(self, hidden_size: int, markov_rank: int, block_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size + markov_rank, 1)
        self.with_markov = markov_rank > 0
        self.register_buffer("temperature_K", torch.ones(block_size), persistent=False)

    def forward(self, h_XH: torch.Tensor, e_XR: torch.Tensor | None) -> torch.Tensor:
        x = torch.cat([h_XH, e_XR], dim=-1) if self.with_markov else h_XH
        return self.proj(x).squeeze(-1)

    def probability(self, logit_X: torch.Tensor, slot: int) -> torch.Tensor:
        """Calibrated confidence (fp32) of 0-based ``slot``; with T = 1 exactly ``sigmoid(logit)`` (x / 1 is exact)."""
        return torch.sigmoid(logit_X.float() / self.temperature_K[slot].float())
