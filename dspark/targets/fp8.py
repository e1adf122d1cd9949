"""Block-FP8 checkpoints (DeepSeek-V3/R1/V3.x, Qwen3-*-FP8): read the quantisation config, dequantise on read.

Such a checkpoint stores most linear weights ``W [..., M, N]`` as ``float8_e4m3fn`` plus a per-block inverse scale
``W_scale_inv [..., ceil(M / b0), ceil(N / b1)]`` (float32), with ``(b0, b1) = weight_block_size`` from
``config.json``'s ``quantization_config``. Block ``(i, j)`` covers rows ``[i * b0, (i + 1) * b0)`` and columns
``[j * b1, (j + 1) * b1)``, cut at the matrix edge (the last block row/column may be partial); the real value is
``float(W[r, c]) * W_scale_inv[r // b0, c // b1]``, computed in fp32 and then cast to the target dtype (DeepSeek's
``weight_dequant`` kernel and transformers' ``FP8Linear`` use the same convention). Leading dims (stacked experts)
pair one to one with the scale's. Everything else (embeddings, norms, router, LM head) is stored unquantised and
passes through.

Only this format is understood. Other ``quant_method`` values (gptq, awq, bitsandbytes, compressed-tensors, ...)
and DeepSeek-V4's layout (MXFP4 routed experts, E8M0 scales under ``.scale`` names) are refused by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SUPPORTED = "only block FP8 checkpoints are supported (quant_method 'fp8', fmt 'e4m3', weight_block_size [rows, cols])"


@dataclass(frozen=True)
class BlockFP8:
    """The block size of a block-FP8 checkpoint: scale ``[i, j]`` covers ``block[0]`` rows x ``block[1]`` columns."""

    block: tuple[int, int]

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BlockFP8 | None:
        """The scheme declared by ``model_dir/config.json``; None without a ``quantization_config`` (or config)."""
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            return None
        config = json.loads(config_path.read_text())
        quant = config.get("quantization_config")
        if quant is None:
            return None
        if isinstance(quant, dict) and "expert_dtype" in config:  # DeepSeek-V4 declares it beside, V4.1 inside
            quant = {"expert_dtype": config["expert_dtype"], **quant}
        return cls.from_config(quant, str(config_path))

    @classmethod
    def from_config(cls, quant: dict, where: str) -> BlockFP8:
        """Validate a ``quantization_config`` dict; anything but block FP8 e4m3 is refused, naming what it is."""
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        if str(method).lower() != "fp8":
            raise ValueError(f"{where}: quantization_config.quant_method={method!r} is not supported; {_SUPPORTED}")
        fmt = str(quant.get("fmt", "e4m3")).lower()
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise ValueError(f"{where}: quantization_config.fmt={quant['fmt']!r} is not supported; {_SUPPORTED}")
        expert_dtype = quant.get("expert_dtype", "fp8")
        if expert_dtype != "fp8":  # DeepSeek-V4(-Flash/Pro): routed experts packed as MXFP4 (e2m1, 1x32 E8M0 scales)
            raise ValueError(f"{where}: quantization_config.expert_dtype={expert_dtype!r} (FP4/MXFP4 experts, as in "
                             f"DeepSeek-V4) is not supported; {_SUPPORTED}")
        scheme = str(quant.get("activation_scheme", "dynamic")).lower()
        if scheme != "dynamic":  # static checkpoints also carry per-tensor activation scales we would not consume
            raise ValueError(f"{where}: quantization_config.activation_scheme={quant['activation_scheme']!r} is not "
                             f"supported (expected 'dynamic'); {_SUPPORTED}")
        block = quant.get("weight_block_size")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ValueError(f"{where}: quantization_config.weight_block_size={block!r} must be two positive integers "
                             f"(per-tensor FP8 without blocks is not supported); {_SUPPORTED}")
        # scale_fmt 'ue8m0' (DeepSeek-V3.1+) describes how the scales were rounded (powers of two); the stored
        # scale tensors are still read by their own dtype, so it needs nothing here.
        return cls(block=(block[0], block[1]))

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The ``_scale_inv`` shape a quantised tensor of ``shape`` must come with."""
        return (*shape[:-2], math.ceil(shape[-2] / self.block[0]), math.ceil(shape[-1] / self.block[1]))

    def pair_scales(self, meta: dict[str, tuple[tuple[int, ...], torch.dtype]], where: str) -> dict[str, str]:
        """Quantised tensor name -> its scale tensor name, after checking every pair (from header metadata only).

        Refuses an FP8 tensor without ``<name>_scale_inv``, a scale of the wrong shape for the block size or of a
        non-float dtype, a scale without its FP8 tensor, and e5m2 tensors.
        """
        pairs = {}
        for name, (shape, dtype) in sorted(meta.items()):
            if dtype not in FP8_DTYPES:
                continue
            if dtype != torch.float8_e4m3fn:
                raise ValueError(f"{where}: tensor {name} is {dtype}, but the checkpoint declares fmt 'e4m3'; "
                                 f"{_SUPPORTED}")
            scale = name + SCALE_SUFFIX
            if scale not in meta:
                native = name.removesuffix(".weight") + ".scale"
                hint = (f" (it has {native}: DeepSeek-V4's native layout, which is not supported)" if native in meta
                        else "")
                raise ValueError(f"{where}: quantised tensor {name} {shape} has no {scale}{hint}; {_SUPPORTED}")
            if len(shape) < 2:
                raise ValueError(f"{where}: quantised tensor {name} has shape {shape}; block FP8 needs >= 2 dims")
            scale_shape, scale_dtype = meta[scale]
            if scale_shape != self.scale_shape(shape):
                raise ValueError(f"{where}: {scale} has shape {scale_shape}, but {name} {shape} with "
                                 f"weight_block_size {list(self.block)} needs {self.scale_shape(shape)}")
            if not scale_dtype.is_floating_point or scale_dtype in FP8_DTYPES:
                raise ValueError(f"{where}: {scale} has dtype {scale_dtype}; expected a float scale (float32)")
            pairs[name] = scale
        orphans = [n for n in meta if n.endswith(SCALE_SUFFIX) and n.removesuffix(SCALE_SUFFIX) not in pairs]
        if orphans:
            raise ValueError(f"{where}: scale tensors without an FP8 weight: {', '.join(sorted(orphans)[:4])}")
        return pairs

    def scale_range(self, dim: int, ndim: int, start: int, stop: int) -> tuple[int, int]:
        """Scale indices along ``dim`` covering weight indices ``[start, stop)`` of a tensor with ``ndim`` dims."""
        if dim < ndim - 2:
            return start, stop  # a leading (expert) dim: one scale slab per weight slab
        size = self.block[dim - (ndim - 2)]
        return start // size, max(start // size, math.ceil(stop / size))


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], first_row: int = 0,
               first_col: int = 0) -> torch.Tensor:
    """fp32 values of an FP8 ``weight [..., m, n]`` cut from a larger matrix at ``(first_row, first_col)``.

    ``scale_inv [..., i, j]`` holds the scales of the block rows/columns the cut touches, starting with the block
    of ``first_row`` / ``first_col``. Rows and columns each look up their own block's scale, so cuts that start
    or stop inside a block and the partial blocks at the matrix edge need no special case.
    """
    rows, cols = weight.shape[-2:]
    row_block = torch.arange(first_row, first_row + rows) // block[0] - first_row // block[0]
    col_block = torch.arange(first_col, first_col + cols) // block[1] - first_col // block[1]
    assert rows == 0 or int(row_block[-1]) < scale_inv.shape[-2], (row_block, scale_inv.shape)
    assert cols == 0 or int(col_block[-1]) < scale_inv.shape[-1], (col_block, scale_inv.shape)
    scale = scale_inv.float().index_select(-2, row_block).index_select(-1, col_block)
    return weight.float().mul_(scale)
