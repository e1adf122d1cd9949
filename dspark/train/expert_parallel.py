"""Expert parallelism for MoE drafters (``train.expert_parallel``), applied from outside the single-device model.

Each group of ``ep`` consecutive ranks splits the routed experts of every ``DraftMoE``: rank ``r`` of the group
keeps experts ``[r * E/ep, (r+1) * E/ep)`` and drops the rest. The router, the shared expert and everything else
stay replicated (ZeRO's data-parallel part).

Token exchange: gather, then all-reduce partial sums. Every rank of the group all-gathers the group's tokens (with
their top-k choices and routing weights), runs only its own experts on them, and the group all-reduces the partial
outputs; each rank keeps its own rows. We chose this over an ``all_to_all_single`` dispatch because it is exact
(each token's routed output is the same sum of the same expert terms as on one device), has no capacity factor or
token dropping, needs only ``all_gather``/``all_reduce`` (which every backend, gloo included, differentiates
cleanly through the two autograd functions below), and its backward is the same two collectives. Its cost is
``ep`` times the MoE activations per rank and a dense all-reduce of them: fine for a drafter's few thousand
block tokens per step; an ``all_to_all_single`` dispatch is the scaling step left.

Gradients: the expert parameters are marked the way DeepSpeed-MoE marks its own (``allreduce=False``,
``group_name="ep_size_<ep>"``) and the wrapper is a ``deepspeed.moe.layer.MoE``, so DeepSpeed's engine finds an
MoE model, builds its expert-parallel and expert-data-parallel groups, splits the optimizer's param groups
(``configure_moe_param_groups``), broadcasts and all-reduces those parameters only over the expert-data-parallel
group (ranks holding the same experts), and divides by the full data-parallel size. The local expert gradient
already sums every rank's tokens of the group (the gather's backward), so the result is the gradient of the mean
loss, as with one process. Checkpoints go through DeepSpeed-MoE's per-expert files (see ``ExpertParallelExperts``);
``gather_experts`` restores the single-device module for export. Tested with ZeRO 0 and 2 (the config refuses
ZeRO-3). The model code (dspark/drafters/v4) never imports torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn


def group_name(ep: int) -> str:
    """DeepSpeed-MoE's name for the expert-parallel group of size ``ep`` (keys its group dictionaries)."""
    return f"ep_size_{ep}"


class _GatherRows(torch.autograd.Function):
    """All-gather ``x_XF`` (row counts may differ per rank) over ``group``; backward sums the gathered rows'
    gradients over the group and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x_XF, group, counts: list[int]):
        ctx.group, ctx.counts, ctx.rank = group, counts, dist.get_rank(group)
        most = max(counts)
        padded_XF = x_XF.new_zeros(most, x_XF.shape[1])
        padded_XF[: x_XF.shape[0]] = x_XF
        pieces = [torch.empty_like(padded_XF) for _ in counts]
        dist.all_gather(pieces, padded_XF.contiguous(), group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, counts)])

    @staticmethod
    def backward(ctx, grad_GF):
        grad_GF = grad_GF.contiguous().clone()
        dist.all_reduce(grad_GF, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad_GF[start : start + ctx.counts[ctx.rank]], None, None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the same sum: every rank's rows feed every rank's loss."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _OneExpert(nn.Module):
    """One routed expert's weights (``gate_up_proj`` 2I x H, ``down_proj`` H x I), a row of transformers' fused
    3-D tensors."""

    def __init__(self, gate_up_IH: torch.Tensor, down_HI: torch.Tensor, group: str):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_IH.clone())
        self.down_proj = nn.Parameter(down_HI.clone())
        for p in (self.gate_up_proj, self.down_proj):  # DeepSpeed-MoE's expert marks (deepspeed.moe.experts)
            p.allreduce, p.group_name = False, group


class ExpertParallelExperts(MoE):
    """This rank's slice of a ``DeepseekV4Experts`` (same call signature), run on the whole group's tokens.

    A ``deepspeed.moe.layer.MoE`` so that DeepSpeed's engine treats the model as an MoE (it looks for that class);
    ``nn.Module.__init__`` is used instead of MoE's, which would build DeepSpeed's own gate and experts. The local
    experts live at DeepSpeed-MoE's path ``deepspeed_moe.experts.deepspeed_experts.<local id>``, one module each,
    because DeepSpeed's checkpointing finds them there: it writes one file per global expert
    (``layer_<L>_expert_<E>_mp_rank_00_model_states.pt``) and, on load, each rank reads back its own experts.
    """

    def __init__(self, full: nn.Module, ep: int, ep_rank: int):
        nn.Module.__init__(self)
        total = full.gate_up_proj.shape[0]
        self.num_experts, self.ep_size, self.num_local_experts = total, ep, total // ep
        self.expert_group_name = group_name(ep)
        self.first = ep_rank * self.num_local_experts
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.experts = nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(
            _OneExpert(full.gate_up_proj.data[e], full.down_proj.data[e], self.expert_group_name)
            for e in range(self.first, self.first + self.num_local_experts))
        self.act_fn, self.limit, self._gate_fn = full.act_fn, full.limit, type(full)._apply_gate
        # The emptied single-device module, kept unregistered for ``gather_experts`` to refill at export.
        full.register_parameter("gate_up_proj", None)
        full.register_parameter("down_proj", None)
        self._full = [full]

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine; the groups already exist (``apply_expert_parallel`` made them)."""

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._gate_fn(self, gate_up)  # V4's clamped SwiGLU, read from transformers' class

    def forward(self, hidden_XH: torch.Tensor, top_k_index_XK: torch.Tensor, top_k_weights_XK: torch.Tensor
                ) -> torch.Tensor:
        group = groups._get_expert_parallel_group(self.expert_group_name)
        rows = torch.tensor([hidden_XH.shape[0]])
        all_rows = [torch.empty_like(rows) for _ in range(self.ep_size)]
        dist.all_gather(all_rows, rows, group=group)
        counts = [int(n) for n in all_rows]
        x_GH = _GatherRows.apply(hidden_XH, group, counts)
        w_GK = _GatherRows.apply(top_k_weights_XK, group, counts)
        index_GK = _GatherRows.apply(top_k_index_XK.float(), group, counts).long()  # fp32: exact below 2**24
        partial_GH = self._local_experts(x_GH, index_GK - self.first, w_GK)
        summed_GH = _SumOverGroup.apply(partial_GH, group)
        start = sum(counts[: dist.get_rank(group)])
        return summed_GH[start : start + hidden_XH.shape[0]]

    def _local_experts(self, x_GH, local_index_GK, weights_GK) -> torch.Tensor:
        """transformers' eager ``DeepseekV4Experts.forward`` over this rank's experts (same terms, same order);
        choices of other ranks' experts fall outside ``0..num_local_experts-1`` and match no local expert."""
        out_GH = torch.zeros_like(x_GH)
        for e, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            slot, token = torch.where(local_index_GK.t() == e)
            if token.numel() == 0:
                continue
            current = self._apply_gate(nn.functional.linear(x_GH[token], expert.gate_up_proj))
            current = nn.functional.linear(current, expert.down_proj) * weights_GK[token, slot, None]
            out_GH = out_GH.index_add(0, token, current.to(out_GH.dtype))
        return out_GH

    def local_expert_ids(self) -> range:
        return range(self.first, self.first + self.num_local_experts)


def apply_expert_parallel(drafter, ep: int, world: int) -> int:
    """Swap every MoE's routed experts for this rank's ``ExpertParallelExperts`` slice; returns how many MoEs.

    Needs the default process group (gloo or nccl) already initialised; creates DeepSpeed's expert groups.
    """
    moes = [m for m in drafter.modules() if hasattr(m, "experts") and hasattr(m.experts, "gate_up_proj")]
    if not moes:
        raise ValueError(f"train.expert_parallel={ep}, but drafter {drafter.algorithm!r} has no routed experts; "
                         "expected algorithm dspark_v4 or train.expert_parallel=1")
    experts = moes[0].experts.gate_up_proj.shape[0]
    if experts % ep or world % ep:
        raise ValueError(f"train.expert_parallel={ep} must divide the routed experts ({experts}) and the world size "
                         f"({world})")
    if group_name(ep) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    ep_rank = dist.get_rank(groups._get_expert_parallel_group(group_name(ep)))
    for moe in moes:
        moe.experts = ExpertParallelExperts(moe.experts, ep, ep_rank)
    return len(moes)


def gather_experts(drafter) -> int:
    """Collective over every expert-parallel group: swap each ``ExpertParallelExperts`` back for the full
    single-device module with all experts (in global order), e.g. before exporting; returns how many."""
    swapped = 0
    for moe in drafter.modules():
        ep_experts = getattr(moe, "experts", None)
        if not isinstance(ep_experts, ExpertParallelExperts):
            continue
        group = groups._get_expert_parallel_group(ep_experts.expert_group_name)
        full = ep_experts._full[0]
        for name in ("gate_up_proj", "down_proj"):
            local = ep_experts.deepspeed_moe.experts.deepspeed_experts
            local_EAB = torch.stack([getattr(x, name).detach() for x in local])
            pieces = [torch.empty_like(local_EAB) for _ in range(ep_experts.ep_size)]
            dist.all_gather(pieces, local_EAB.contiguous(), group=group)
            setattr(full, name, nn.Parameter(torch.cat(pieces)))
        moe.experts = full
        swapped += 1
    return swapped
