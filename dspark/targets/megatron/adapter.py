"""HF checkpoint -> this rank's shards of the model ``parallelize.py`` prepared on the meta device.

A rank reads only the rows or columns it owns (``WeightIndex.load_slice``), so no rank ever holds a whole
projection, let alone the whole model; routed experts stored one tensor per expert (DeepSeek's hub layout) are read
expert by expert, and FP8 checkpoints are dequantised on read, both by the index. Parameter names are transformers'
(= the checkpoint's), so the split map from ``parallelize`` is all the loader needs.
"""

from __future__ import annotations

import torch
from torch import nn

from dspark.targets.weights import expert_parts


def _read(index, name: str, shape: tuple[int, ...], split: tuple[int, int, int] | None,
          dtype: torch.dtype) -> torch.Tensor:
    """Parameter ``name`` (full shape ``shape``) narrowed to ``split`` = (dim, start, stop), or whole."""
    if split is None:
        return index.load(name, dtype)
    dim, start, stop = split
    pieces = expert_parts(index, name, shape)
    if pieces is not None:  # this rank's experts, each fused as transformers holds them (gate rows, then up rows)
        prefix, fused = name.rsplit(".", 1)
        projs = ("down_proj",) if fused == "down_proj" else ("gate_proj", "up_proj")
        return torch.stack([torch.cat([index.load(f"{prefix}.{e}.{proj}.weight", dtype) for proj in projs])
                            for e in range(start, stop)])
    real_stop = min(stop, shape[dim])  # the padded vocabulary's last rows are not in the checkpoint
    part = index.load_slice(name, dim, min(start, real_stop), real_stop, dtype)
    if part.shape[dim] == stop - start:
        return part
    padded = part.new_zeros(*shape[:dim], stop - start, *shape[dim + 1:])
    padded.narrow(dim, 0, part.shape[dim]).copy_(part)
    return padded


@torch.no_grad()
def load_shards(model: nn.Module, splits: dict[str, tuple[int, int, int]], full_shapes: dict[str, tuple[int, ...]],
                index, device: torch.device | str) -> None:
    """Replace every meta parameter of ``model`` by this rank's part read from ``index`` (``splits``: name ->
    (dim, start, stop) of the full tensor, others whole), on ``device``; persistent buffers are read whole.
    Tied parameters are read once and stay shared."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for leaf, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, leaf))
    previous_group = None
    for name, param in list(model.named_parameters()):  # tied parameters once, under their first name
        # Pages of the memory-mapped shards that a read touched count towards RSS while mapped (a column slice
        # touches the whole tensor): unmap after each layer so the peak stays one layer above the local shards.
        group = name.split(".")[:3]
        if group != previous_group:
            index.close()
            previous_group = group
        value = _read(index, name, full_shapes[name], splits.get(name), param.dtype)
        assert value.shape == param.shape, (name, tuple(value.shape), tuple(param.shape))
        loaded = nn.Parameter(value.to(device), requires_grad=False)
        loaded.__dict__.update(param.__dict__)  # megatron's tensor-parallel attributes
        for module, leaf in owners[id(param)]:
            module._parameters[leaf] = loaded
    for module_name, module in model.named_modules():
        for leaf, buf in module.named_buffers(recurse=False):
            if leaf not in module._non_persistent_buffers_set:
                module._buffers[leaf] = index.load(f"{module_name}.{leaf}", buf.dtype)
    index.close()
    model.to(device)  # the buffers: read above, or computed from the config when the model was built
