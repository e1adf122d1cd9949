"""Test doubles of the ``Drafter`` interface for the evaluation tests (decoding only, no training).

``OracleDrafter`` reads the token ids back from the embedding-layer features (target layer id -1) and runs the
target itself; ``FixedDistributionDrafter`` samples from a fixed distribution whatever the context. ``PackedCost``
wraps a target whose batched session should be planned as a packed (ragged) verifier.
"""

from __future__ import annotations

import torch

from dspark.drafters.base import Drafter, Proposal


class OracleDrafter(Drafter):
    """Proposes the target's own continuation; at T = 0 optionally corrupts slots to force partial acceptance."""

    algorithm = "oracle"

    def __init__(self, target, block_size: int, corrupt_prob: float = 0.0, seed: int = 0):
        super().__init__()
        assert target.layer_ids[0] == -1, "the oracle reads token ids from the embedding features"
        self.target = target
        self.block_size = block_size
        self.corrupt_prob = corrupt_prob
        self.corrupt_gen = torch.Generator().manual_seed(seed)

    def forward_loss(self, batch, generator=None):
        raise NotImplementedError("test double: decoding only")

    def _token_ids(self, context_TLH: torch.Tensor) -> list[int]:
        dist_TV = torch.cdist(context_TLH[:, 0], self.target.embed_weight, compute_mode="donot_use_mm_for_euclid_dist")
        best_T = dist_TV.min(dim=-1)
        assert float(best_T.values.max()) == 0.0, "context features are not exact embeddings"
        return best_T.indices.tolist()

    def propose(self, context_TLH, anchor_id, *, temperature, generator=None) -> Proposal:
        session = self.target.decode_session()
        logits_NV, _ = session.extend(torch.tensor(self._token_ids(context_TLH) + [anchor_id]))
        vocab = logits_NV.shape[-1]
        tokens, probs = [], []
        for _ in range(self.block_size):
            if temperature == 0:
                token = int(logits_NV[-1].argmax())
                if float(torch.rand((), generator=self.corrupt_gen)) < self.corrupt_prob:
                    token = (token + 1 + int(torch.randint(vocab - 1, (), generator=self.corrupt_gen))) % vocab
                p_V = torch.nn.functional.one_hot(torch.tensor(token), vocab).float()
            else:
                p_V = torch.softmax(logits_NV[-1] / temperature, dim=-1)
                token = int(torch.multinomial(p_V, 1, generator=generator))
            tokens.append(token)
            probs.append(p_V)
            logits_NV, _ = session.extend(torch.tensor([token]))
        return Proposal(tokens_K=torch.tensor(tokens), probs_KV=torch.stack(probs))


class FixedDistributionDrafter(Drafter):
    """Drafts by a fixed rule whatever the features: with probability ``repeat_prob`` the previous token (the
    anchor at slot 1), else a draw from ``probs_V``. ``probs_KV`` reports that per-slot mixture, unless
    ``misreport``: then it claims plain ``probs_V``, a wrong claim that breaks losslessness (negative control).
    Confidences are 0.5 per slot, or ``confidence_of(previous token)`` (the anchor at slot 1) when given: like the
    DSpark head, slot k's confidence reads the token before it, never the token it scores."""

    algorithm = "fixed"

    def __init__(self, probs_V: torch.Tensor, block_size: int, repeat_prob: float = 0.0, misreport: bool = False,
                 confidence_of=None):
        super().__init__()
        self.confidence_of = confidence_of
        self.probs_V = probs_V
        self.block_size = block_size
        self.repeat_prob = repeat_prob
        self.misreport = misreport

    def forward_loss(self, batch, generator=None):
        raise NotImplementedError("test double: decoding only")

    def propose(self, context_TLH, anchor_id, *, temperature, generator=None) -> Proposal:
        vocab = self.probs_V.shape[0]
        previous = anchor_id
        tokens, rows, confidences = [], [], []
        for _ in range(self.block_size):
            confidences.append(self.confidence_of(previous) if self.confidence_of is not None else 0.5)
            row_V = self.probs_V
            if self.repeat_prob > 0:
                repeat_V = torch.nn.functional.one_hot(torch.tensor(previous), vocab).float()
                row_V = self.repeat_prob * repeat_V + (1 - self.repeat_prob) * self.probs_V
            previous = int(torch.multinomial(row_V, 1, generator=generator))
            tokens.append(previous)
            rows.append(self.probs_V if self.misreport else row_V)
        tokens_K = torch.tensor(tokens)
        if temperature == 0:
            probs_KV = torch.nn.functional.one_hot(tokens_K, vocab).float()
        else:
            probs_KV = torch.stack(rows)
        return Proposal(tokens_K=tokens_K, probs_KV=probs_KV, confidence_K=torch.tensor(confidences))


def hashed_confidence(token: int) -> float:
    """A confidence in [0.1, 0.95] that varies with the token (a stand-in for a head that reads the previous token)."""
    return 0.1 + 0.85 * ((token * 2654435761) % 1009) / 1008


def arbitrary_distribution(vocab: int, support: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    probs_V = torch.zeros(vocab)
    probs_V[torch.tensor(support)] = torch.rand(len(support), generator=gen) + 0.1
    return probs_V / probs_V.sum()


class PackedCost:
    """``target`` whose batched session says it does not pad rows to the longest feed (``pads_rows = False``), as
    a packed (ragged) verifier would: the scheduler then plans with the paper's Algorithm 1 (per-request prefixes)
    instead of the common-prefix form, while the session still runs the ragged prefixes in one forward."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        return getattr(self.target, name)

    def batch_decode_session(self, *args):
        session = self.target.batch_decode_session(*args)

        class Packed:
            pads_rows = False

            def __getattr__(self, name):
                return getattr(session, name)

        return Packed()
