"""Megatron-core tensor parallelism: process groups, and the parallel layers ``parallelize.py`` swaps in.

Only the tensor-parallel building blocks are used (``ColumnParallelLinear``, ``RowParallelLinear``,
``VocabParallelEmbedding``): megatron's ``GPTModel`` calls CUDA unconditionally, these layers run on CPU/gloo
with ``use_cpu_initialization``. Layers are created without initialisation (the weights come from the
checkpoint), which also lets them be built on the meta device. Importing this module imports megatron (~2 s):
only the megatron backend does.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


def init_tensor_parallel(tp_size: int) -> None:
    """Initialise torch.distributed (gloo on CPU) and megatron's model-parallel groups for ``tp_size``.

    Several targets in one process share megatron's global state, so a second call must ask for the same size.
    """
    from dspark.distributed import init_distributed

    _, world = init_distributed()
    if world % tp_size:
        raise ValueError(f"target.tensor_parallel={tp_size} does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        current = parallel_state.get_tensor_model_parallel_world_size()
        if current != tp_size:
            raise ValueError(f"megatron parallel state is already initialised with tensor_parallel={current}, "
                             f"this target asks for {tp_size}")
        return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def dp_rank() -> int:
    """Index of this rank's tensor-parallel group among the world's (megatron's data-parallel rank)."""
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def padded_vocab_size(vocab_size: int, size: int) -> int:
    """Megatron pads the vocabulary so every rank owns the same number of rows; pad rows are never looked up
    (ids < vocab_size) and their logits are cut off after the gather."""
    return -(-vocab_size // size) * size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel group, in place (for partial sums megatron's layers do not produce)."""
    if tp_size() > 1:
        dist.all_reduce(x, group=tp_group())
    return x


def gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the TP ranks' shards of the last dim (megatron's own gather allocates on CUDA)."""
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())]
    dist.all_gather(parts, x.contiguous(), group=tp_group())
    return torch.cat(parts, dim=-1)


@functools.cache
def _config(dtype: torch.dtype) -> ModelParallelConfig:
    return ModelParallelConfig(tensor_model_parallel_size=tp_size(), use_cpu_initialization=True,
                               perform_initialization=False, gradient_accumulation_fusion=False, params_dtype=dtype)


def _no_init(weight: torch.Tensor) -> None:
    """Weights are overwritten from the checkpoint; megatron skips init with perform_initialization=False."""


class ColumnLinear(ColumnParallelLinear):
    """``nn.Linear`` with its output features split over the group (whole heads / MLP columns per rank).
    Megatron's linears return (output, bias) with the bias already added; HF modules want the output only."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__(in_features, out_features, config=_config(dtype), init_method=_no_init, bias=bias,
                         gather_output=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class RowLinear(RowParallelLinear):
    """``nn.Linear`` with its input features split over the group; the partial products are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__(in_features, out_features, config=_config(dtype), init_method=_no_init, bias=bias,
                         input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class VocabEmbedding(VocabParallelEmbedding):
    """The token embedding with the (padded) vocabulary rows split over the group. ``embed_scale`` (a buffer,
    None unless the family scales its embedding: Gemma4's sqrt(H)) multiplies the looked-up rows in the weight's
    dtype after the reduce, as the family's own embedding module does."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__(padded_vocab_size(vocab_size, tp_size()), hidden_size, init_method=_no_init,
                         config=_config(dtype))
        self.register_buffer("embed_scale", None, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        return out if self.embed_scale is None else out * self.embed_scale.to(self.weight.dtype)


class VocabHead(ColumnLinear):
    """The LM head with the (padded) vocabulary split over the group; returns the full-vocabulary logits (gathered
    over the group, pad columns cut), so HF's generation and the decode sessions see ordinary logits."""

    def __init__(self, hidden_size: int, vocab_size: int, dtype: torch.dtype):
        super().__init__(hidden_size, padded_vocab_size(vocab_size, tp_size()), False, dtype)
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_last_dim(super().forward(x))[..., : self.vocab_size]
