"""The one interface every drafter implements. The trainer and the evaluator never branch on the algorithm.

Legend: B batch, T tokens, L feature layers, H hidden size, V vocab, K block size (gamma), A anchors.
Single-device torch only: nothing under ``dspark/drafters`` imports deepspeed, megatron or torch.distributed.

Training batch (a dict of tensors, right-padded; built by ``dspark.data.collate``):
    input_ids_BT     long   token ids
    loss_mask_BT     bool   True at supervised (assistant) tokens; False at padding
    features_BTLH    float  target hidden states at ``layer_ids`` (raw decoder-layer outputs)
    final_BTH        float  target final hidden state (post-norm, pre-LM-head)

``forward_loss`` returns a ``LossOutput`` whose ``numerator`` is the weighted loss *sum* on this rank and
``weight_sum`` the sum of position weights on this rank; the trainer divides by the all-rank weight sum so
every term is normalised globally (DESIGN section 4).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn

BATCH_KEYS = ("input_ids_BT", "loss_mask_BT", "features_BTLH", "final_BTH")


def check_training_batch(batch: dict[str, torch.Tensor]) -> None:
    """Refuse a training batch that lacks a field, naming what is missing and what is expected."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"training batch lacks {', '.join(missing)}; expected keys {', '.join(BATCH_KEYS)}")


@dataclass
class LossOutput:
    numerator: torch.Tensor  # scalar, differentiable: sum over valid slots of w_k * (combined loss terms)
    weight_sum: torch.Tensor  # scalar, detached: sum of w_k over valid slots on this rank
    # Per-term weighted sums (detached, same normalisation as numerator), e.g. {"ce": ..., "l1": ..., "bce": ...}
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per-position sums for logging: accept_sum_K = sum over valid slots at k of (1 - TV), count_K = #valid.
    accept_sum_K: torch.Tensor | None = None
    count_K: torch.Tensor | None = None
    num_tokens: int = 0  # supervised block tokens in this batch


@dataclass
class Proposal:
    tokens_K: torch.Tensor  # long [k] proposed tokens, k <= block size
    probs_KV: torch.Tensor  # fp32 [k, V] the distribution each token was drawn from (at the temperature)
    confidence_K: torch.Tensor | None = None  # fp32 [k] confidence head output, when present


class Drafter(nn.Module, abc.ABC):
    """Trainable drafter around the frozen target embedding and LM head."""

    algorithm: str

    @abc.abstractmethod
    def forward_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> LossOutput:
        """Sample anchors (with ``generator``), build blocks, return the loss parts."""

    @abc.abstractmethod
    def propose(self, context_TLH: torch.Tensor, anchor_id: int, *, temperature: float,
                generator: torch.Generator | None = None) -> Proposal:
        """Draft a block after ``anchor_id``.

        ``context_TLH`` holds the target features of every position before the anchor (the anchor sits at
        position T). ``temperature`` 0 means greedy (probs one-hot at the argmax).
        """

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> LossOutput:
        # The training engine calls the module; forward is the loss so DeepSpeed's hooks (ZeRO-3 gathering,
        # precision casts) see every call.
        return self.forward_loss(batch, generator)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]
