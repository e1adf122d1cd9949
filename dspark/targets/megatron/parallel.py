"""Megatron-core tensor parallelism for the decoder in ``model.py``: process groups and the layer factory.

Only the tensor-parallel building blocks are used (``ColumnParallelLinear``, ``RowParallelLinear``,
``VocabParallelEmbedding``): megatron's ``GPTModel`` calls CUDA unconditionally, these layers run on CPU/gloo
with ``use_cpu_initialization``. Layers are created without initialisation (the weights come from the
checkpoint), which also lets the whole model be built on the meta device. Importing this module imports
megatron (~2 s): only the megatron backend does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn


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


def dp_rank() -> int:
    """Index of this rank's tensor-parallel group among the world's (megatron's data-parallel rank)."""
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def tp_src_rank() -> int:
    """Global rank of the first member of this rank's tensor-parallel group."""
    return parallel_state.get_tensor_model_parallel_src_rank()


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Megatron pads the vocabulary so every rank owns the same number of rows; pad rows are never looked up
    (ids < vocab_size) and their logits are cut off after the gather."""
    return -(-vocab_size // tp_size) * tp_size


def gather_last_dim(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Concatenate the TP ranks' shards of the last dim (megatron's own gather allocates on CUDA)."""
    if tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    dist.all_gather(parts, x.contiguous(), group=tp_group())
    return torch.cat(parts, dim=-1)


class MegatronLayers:
    """``model.LayerFactory`` over megatron-core's tensor-parallel layers; forwards return tensors only."""

    def __init__(self, tp_size: int, dtype: torch.dtype):
        self.tp_size = tp_size
        self.tp_rank = tp_rank()
        self.config = ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                                          perform_initialization=False, gradient_accumulation_fusion=False,
                                          params_dtype=dtype)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x, group=tp_group())
        return x

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return _Column(in_features, out_features, config=self.config, init_method=_no_init, bias=bias,
                       gather_output=False)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return _Row(in_features, out_features, config=self.config, init_method=_no_init, bias=bias,
                    input_is_parallel=True, skip_bias_add=False)

    def embedding(self, vocab_size: int, hidden_size: int) -> nn.Module:
        return VocabParallelEmbedding(padded_vocab_size(vocab_size, self.tp_size), hidden_size,
                                      init_method=_no_init, config=self.config)


def _no_init(weight: torch.Tensor) -> None:
    """Weights are overwritten from the checkpoint; megatron skips init with perform_initialization=False."""


class _Column(ColumnParallelLinear):
    """Megatron linears return (output, bias); the bias is already added, the decoder wants the output only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class _Row(RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]
