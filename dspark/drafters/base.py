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
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

BATCH_KEYS = ("input_ids_BT", "loss_mask_BT", "features_BTLH", "final_BTH")


def check_training_batch(batch: dict[str, torch.Tensor]) -> None:
    """Refuse a training batch that lacks a field, naming what is missing and what is expected."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"training batch lacks {', '.join(missing)}; expected keys {', '.join(BATCH_KEYS)}")


class LossOutput(NamedTuple):
    """What ``forward_loss`` returns. A tuple, so a wrapper that hooks a module's tensor outputs (ZeRO-3 regathers
    the parameters the forward used when the gradient reaches them) sees its tensors."""

    numerator: torch.Tensor  # scalar, differentiable: sum over valid slots of w_k * (combined loss terms)
    weight_sum: torch.Tensor  # scalar, detached: sum of w_k over valid slots on this rank
    # Per-term weighted sums (detached, same normalisation as numerator), e.g. {"ce": ..., "l1": ..., "bce": ...}
    terms: dict[str, torch.Tensor]
    # Per-position sums for logging: accept_sum_K = sum over valid slots at k of (1 - TV), count_K = #valid.
    accept_sum_K: torch.Tensor | None = None
    count_K: torch.Tensor | None = None
    num_tokens: int = 0  # supervised block tokens in this batch


@dataclass
class Proposal:
    tokens_K: torch.Tensor  # long [k] proposed tokens, k <= block size
    probs_KV: torch.Tensor  # fp32 [k, V] the distribution each token was drawn from (at the temperature)
    confidence_K: torch.Tensor | None = None  # fp32 [k] confidence head output, when present


def sample_rows(logits_BV: torch.Tensor, temperature: float, generators: list[torch.Generator | None]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row for a batched proposal step: ``(tokens_B, probs_BV)``, probs = ``softmax(logits / T)`` in
    fp32 (one-hot at the argmax for T = 0). Row b draws from ``generators[b]`` alone, exactly as a batch of one
    would, so each row's random stream does not depend on the rows drafted beside it."""
    if temperature == 0:
        tokens_B = logits_BV.argmax(dim=-1)
        return tokens_B, F.one_hot(tokens_B, logits_BV.shape[-1]).float()
    probs_BV = (logits_BV.float() / temperature).softmax(dim=-1)
    # torch.multinomial takes one generator per call: one call per row, each on its own generator.
    tokens_B = torch.cat([torch.multinomial(probs_BV[b : b + 1], 1, generator=g).view(1)
                          for b, g in enumerate(generators)])
    return tokens_B, probs_BV


class Drafter(nn.Module, abc.ABC):
    """Trainable drafter around the frozen target embedding and LM head.

    Besides the loss and the proposals, the interface declares the optional parts callers may use; the defaults
    here say "not supported", and a drafter that has the part overrides them.
    """

    algorithm: str
    block_size: int  # tokens drafted per proposal (K)
    # The evaluator passes every row's context token ids to ``propose_batch`` (``context_ids``).
    needs_context_ids: bool = False
    # True while a pruned draft vocabulary still has to be fitted: the trainer then calls ``fit_draft_vocab``.
    needs_token_counts: bool = False
    # ``propose_batch`` takes ``stop_drafting(confidences) -> bool`` and stops drafting at the first slot it says
    # no draft can be verified from (``dspark.drafters.parts.draft_slots``); the evaluator passes it when its verify
    # policy cuts drafts by their confidences.
    cuts_drafting: bool = False
    # The export formats that can hold this drafter (``dspark.export`` refuses the others); None = every format
    # that knows the algorithm.
    export_formats: tuple[str, ...] | None = None
    # Sums routed-expert loads over the data ranks (``counts_E -> counts_E``); set from outside (``dspark.train``)
    # when there are several ranks, read by drafters with routed experts (aux-loss-free balancing).
    reduce_expert_counts: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self):
        super().__init__()
        # The confidence head (``ConfidenceHead``) of drafters that have one; None = no confidence per slot.
        self.confidence_head: nn.Module | None = None

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

    def propose_batch(self, contexts: list[torch.Tensor], anchor_ids: list[int], *, temperature: float,
                      generators: list[torch.Generator | None], context_ids: list[torch.Tensor] | None = None
                      ) -> list[Proposal]:
        """``propose`` for several rows at once (one ``Proposal`` per row, in order); the rows' contexts may
        differ in length. Row b samples only from ``generators[b]``, in the order ``propose`` would, so a row's
        proposal does not depend on the rows drafted with it. ``context_ids[b]`` (drafters with
        ``needs_context_ids``) are the token ids of row b's context positions.

        This default drafts one row at a time; drafters that can batch override it (and then implement ``propose``
        as the batch of one). Drafters with ``cuts_drafting`` also take ``stop_drafting`` (see there).
        """
        if not len(contexts) == len(anchor_ids) == len(generators):
            raise ValueError(f"propose_batch got {len(contexts)} contexts, {len(anchor_ids)} anchors and "
                             f"{len(generators)} generators; expected one of each per row")
        proposals = []
        for b, (context_TLH, anchor_id, generator) in enumerate(zip(contexts, anchor_ids, generators)):
            ids = {"context_ids_T": context_ids[b]} if context_ids is not None else {}
            proposals.append(self.propose(context_TLH, anchor_id, temperature=temperature, generator=generator, **ids))
        return proposals

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> LossOutput:
        # The training engine calls the module; forward is the loss so DeepSpeed's hooks (ZeRO-3 gathering,
        # precision casts) see every call.
        return self.forward_loss(batch, generator)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters that ``forward`` uses outside their own module's ``forward`` (e.g. a weight passed to a fused
        loss). A sharded wrapper must gather them for the whole drafter forward (``dspark.train`` registers them
        with ZeRO-3). None by default."""
        return []

    def reset_context_cache(self) -> None:
        """Forget what earlier proposals cached (a ``PrefixCache`` of context rows, for drafters that keep one), to
        start cold or to free it when the weights' storage may be reused (ZeRO-3 gathers). Nothing by default."""

    def fit_draft_vocab(self, samples) -> None:
        """Fit a pruned draft vocabulary to the supervised tokens of ``samples`` (see ``needs_token_counts``)."""
        raise ValueError(f"drafter {self.algorithm!r} has no draft vocabulary to fit")

    def init_from_target(self, model_dir) -> list[str]:
        """Copy draft layers from the target checkpoint at ``model_dir``; returns the names copied."""
        raise ValueError(f"drafter.init_from_target is set, but drafter {self.algorithm!r} has no target layers to "
                         "copy; expected algorithm dspark, dflash or dspark_v4")

    def set_confidence_temperatures(self, temperatures: list[float]) -> None:
        """Per-slot STS temperatures for the confidence head (``calibration.json``; ones = uncalibrated)."""
        if self.confidence_head is None:
            raise ValueError(f"drafter {self.algorithm} has no confidence head to calibrate "
                             "(drafter.dspark.enable_confidence_head is off)")
        if len(temperatures) != self.block_size or not all(math.isfinite(t) and t > 0 for t in temperatures):
            raise ValueError(f"expected {self.block_size} confidence temperatures > 0 (one per slot), got "
                             f"{list(temperatures)!r}")
        buffer = self.confidence_head.temperature_K
        # Replaced rather than copied into, so a drafter cast to bf16 still divides by the exact fp32 values.
        self.confidence_head.temperature_K = torch.tensor(temperatures, dtype=torch.float32, device=buffer.device)
