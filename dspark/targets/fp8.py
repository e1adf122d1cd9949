"""Quantised checkpoints that are dequantised on read: block FP8 (DeepSeek-V3/R1/V3.x, Qwen3-*-FP8) and
DeepSeek-V4's FP8 + MXFP4 layout.

**Block FP8.** Most linear weights ``W [..., M, N]`` are stored as ``float8_e4m3fn`` plus one scale per block,
``[..., ceil(M / b0), ceil(N / b1)]``, with ``(b0, b1) = weight_block_size`` from ``config.json``'s
``quantization_config``. Block ``(i, j)`` covers rows ``[i * b0, (i + 1) * b0)`` and columns ``[j * b1, (j + 1) *
b1)``, cut at the matrix edge (the last block row/column may be partial); the real value is ``float(W[r, c]) *
scale[r // b0, c // b1]``, computed in fp32 and then cast to the target dtype (DeepSeek's ``weight_dequant`` kernel
and transformers' ``FP8Linear`` use the same convention). Leading dims (stacked experts) pair one to one with the
scale's. The scale is float32 under ``<name>_scale_inv`` (V3), or E8M0 (``float8_e8m0fnu``, the power of two
``2 ** (byte - 127)``; ``scale_fmt: ue8m0``) under ``<module>.scale`` beside ``<module>.weight`` (V4's own names;
transformers' FP8 quantizer renames ``.scale`` to ``.weight_scale_inv``). Either name, either dtype.

**MXFP4** (DeepSeek-V4-Flash/Pro routed experts, declared by ``expert_dtype: fp4`` beside or inside the
``quantization_config``). A logical ``W [..., M, K]`` is stored as ``int8 [..., M, K / 2]``: byte ``b`` of a row
holds columns ``2b`` (low nibble) and ``2b + 1`` (high nibble), each an OCP e2m1 code (bit 3 sign, bits 2-1
exponent with bias 1, bit 0 mantissa: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), with one E8M0 scale per
1 x 32 block, ``[..., M, K / 32]``. This is how transformers' ``Fp8Dequantize`` unpacks FP4 (its LUT, nibble order
and scale grid; the tests check against it); ``K`` must be a multiple of 32, as in every V4 expert.

Everything else (embeddings, norms, router, LM head, V4's compressor/indexer projections) is stored unquantised and
passes through. Other ``quant_method`` values (gptq, awq, bitsandbytes, compressed-tensors, mxfp4 as a method, ...),
other expert dtypes, per-tensor FP8 and static activation scales are refused by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

SCALE_SUFFIX = "_scale_inv"  # <name>_scale_inv (V3, transformers' own names)
NATIVE_SCALE = ".scale"  # <module>.scale beside <module>.weight (DeepSeek-V4's own names)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E8M0 = torch.float8_e8m0fnu
FP4_PACKED = torch.int8  # how safetensors stores two e2m1 codes per byte (dtype I8)
MXFP4_BLOCK = 32  # logical columns per MXFP4 scale
EXPERT_DTYPES = ("fp8", "fp4")
_SUPPORTED = ("only block FP8 checkpoints are supported (quant_method 'fp8', fmt 'e4m3', weight_block_size [rows, "
              "cols]; expert_dtype 'fp8' or 'fp4' for DeepSeek-V4's MXFP4 experts)")


@dataclass(frozen=True)
class Quantized:
    """How one stored tensor is quantised: its ``scale`` tensor (stored name), the logical ``block`` (rows x columns)
    one scale covers, and whether it is ``packed`` MXFP4 (two e2m1 codes per byte along the last dim)."""

    scale: str
    block: tuple[int, int]
    packed: bool

    def logical_shape(self, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The dequantised tensor's shape (the packed last dim counts two values per byte)."""
        return (*stored_shape[:-1], 2 * stored_shape[-1]) if self.packed else stored_shape


@dataclass(frozen=True)
class BlockFP8:
    """A block-FP8 checkpoint's scheme: scale ``[i, j]`` of an FP8 tensor covers ``block[0]`` rows x ``block[1]``
    columns; ``expert_dtype`` 'fp4' lets int8 tensors with scales be read as MXFP4."""

    block: tuple[int, int]
    expert_dtype: str = "fp8"

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
            quant = {"expert_dtype": config["expert_dtype"], **quant}  # (transformers lets the inside one win)
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
        expert_dtype = quant.get("expert_dtype") or "fp8"
        if expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"{where}: quantization_config.expert_dtype={expert_dtype!r} is not supported (expected "
                             f"'fp8', or 'fp4' for MXFP4 experts as in DeepSeek-V4); {_SUPPORTED}")
        scheme = str(quant.get("activation_scheme", "dynamic")).lower()
        if scheme != "dynamic":  # static checkpoints also carry per-tensor activation scales we would not consume
            raise ValueError(f"{where}: quantization_config.activation_scheme={quant['activation_scheme']!r} is not "
                             f"supported (expected 'dynamic'); {_SUPPORTED}")
        block = quant.get("weight_block_size")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ValueError(f"{where}: quantization_config.weight_block_size={block!r} must be two positive integers "
                             f"(per-tensor FP8 without blocks is not supported); {_SUPPORTED}")
        # scale_fmt 'ue8m0' (DeepSeek-V3.1+, V4) says the scales are powers of two; the stored scale tensors are read
        # by their own dtype (float32 or E8M0), so it needs nothing here.
        return cls(block=(block[0], block[1]), expert_dtype=expert_dtype)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale shape a block-FP8 tensor of ``shape`` must come with."""
        return (*shape[:-2], math.ceil(shape[-2] / self.block[0]), math.ceil(shape[-1] / self.block[1]))

    def pair_scales(self, meta: dict[str, tuple[tuple[int, ...], torch.dtype]], where: str) -> dict[str, Quantized]:
        """Quantised tensor name -> how it is quantised, after checking every pair (from header metadata only).

        An FP8 tensor needs exactly one of ``<name>_scale_inv`` / ``<module>.scale``; an int8 tensor with one is
        MXFP4 (refused unless ``expert_dtype`` is 'fp4'). Refuses a scale of the wrong shape or dtype, a packed
        width that is not whole 32-column blocks, an E8M0 or ``_scale_inv`` tensor without its weight, and e5m2.
        """
        pairs = {}
        for name, (shape, dtype) in sorted(meta.items()):
            scales = [s for s in scale_names(name) if s in meta]
            if dtype == FP4_PACKED and scales:
                pairs[name] = self._check_fp4(name, shape, scales, meta, where)
            elif dtype in FP8_DTYPES:
                pairs[name] = self._check_fp8(name, shape, dtype, scales, meta, where)
        used = {q.scale for q in pairs.values()}
        orphans = [n for n, (_, dtype) in meta.items() if n not in used and n not in pairs
                   and (n.endswith(SCALE_SUFFIX) or dtype == E8M0)]
        if orphans:
            raise ValueError(f"{where}: scale tensors without a quantised weight: {', '.join(sorted(orphans)[:4])}")
        return pairs

    def _check_fp8(self, name, shape, dtype, scales, meta, where) -> Quantized:
        if dtype != torch.float8_e4m3fn:
            raise ValueError(f"{where}: tensor {name} is {dtype}, but the checkpoint declares fmt 'e4m3'; "
                             f"{_SUPPORTED}")
        scale = _one_scale(name, shape, scales, where)
        if len(shape) < 2:
            raise ValueError(f"{where}: quantised tensor {name} has shape {shape}; block FP8 needs >= 2 dims")
        _check_scale(meta, scale, self.scale_shape(shape),
                     f"{name} {shape} with weight_block_size {list(self.block)}", where)
        return Quantized(scale=scale, block=self.block, packed=False)

    def _check_fp4(self, name, shape, scales, meta, where) -> Quantized:
        scale = _one_scale(name, shape, scales, where)
        if self.expert_dtype != "fp4":
            raise ValueError(f"{where}: {name} is int8 with a scale ({scale}), i.e. packed FP4 (MXFP4), but "
                             f"quantization_config.expert_dtype is {self.expert_dtype!r}; expected 'fp4'")
        if len(shape) < 2:
            raise ValueError(f"{where}: packed FP4 tensor {name} has shape {shape}; MXFP4 needs >= 2 dims")
        if (2 * shape[-1]) % MXFP4_BLOCK:
            raise ValueError(f"{where}: packed FP4 tensor {name} {shape} is {shape[-1]} bytes ({2 * shape[-1]} values) "
                             f"wide; MXFP4 needs whole blocks of {MXFP4_BLOCK} values ({MXFP4_BLOCK // 2} bytes)")
        logical = (*shape[:-1], 2 * shape[-1])
        _check_scale(meta, scale, (*shape[:-1], logical[-1] // MXFP4_BLOCK),
                     f"packed FP4 {name} {shape} ({logical} values, one scale per {MXFP4_BLOCK})", where)
        return Quantized(scale=scale, block=(1, MXFP4_BLOCK), packed=True)


def scale_names(name: str) -> list[str]:
    """Where a quantised tensor's scale may be stored: ``<name>_scale_inv``, or ``<module>.scale`` for a
    ``<module>.weight`` (DeepSeek-V4)."""
    names = [name + SCALE_SUFFIX]
    if name.endswith(".weight"):
        names.append(name.removesuffix(".weight") + NATIVE_SCALE)
    return names


def _one_scale(name: str, shape: tuple[int, ...], scales: list[str], where: str) -> str:
    if not scales:
        raise ValueError(f"{where}: quantised tensor {name} {shape} has no scale (expected "
                         f"{' or '.join(scale_names(name))}); {_SUPPORTED}")
    if len(scales) > 1:
        raise ValueError(f"{where}: quantised tensor {name} has two scales ({', '.join(scales)}); expected one")
    return scales[0]


def _check_scale(meta, scale: str, want: tuple[int, ...], what: str, where: str) -> None:
    scale_shape, scale_dtype = meta[scale]
    if scale_shape != want:
        raise ValueError(f"{where}: {scale} has shape {scale_shape}, but {what} needs {want}")
    if not scale_dtype.is_floating_point or scale_dtype in FP8_DTYPES:
        raise ValueError(f"{where}: {scale} has dtype {scale_dtype}; expected a float scale (float32, or "
                         f"float8_e8m0fnu powers of two)")


def scale_range(block: tuple[int, int], dim: int, ndim: int, start: int, stop: int) -> tuple[int, int]:
    """Scale indices along ``dim`` covering logical indices ``[start, stop)`` of a tensor with ``ndim`` dims."""
    if dim < ndim - 2:
        return start, stop  # a leading (expert) dim: one scale slab per weight slab
    size = block[dim - (ndim - 2)]
    return start // size, max(start // size, math.ceil(stop / size))


def e2m1_values() -> torch.Tensor:
    """The 16 e2m1 code values, code ``s eem`` -> ``(-1)^s * (m / 2 if e == 0 else 2^(e - 1) * (1 + m / 2))``."""
    codes = torch.arange(16)
    sign, exponent, mantissa = codes >> 3, (codes >> 1) & 3, (codes & 1).float()
    magnitude = torch.where(exponent == 0, mantissa / 2, torch.exp2(exponent.float() - 1) * (1 + mantissa / 2))
    return torch.where(sign == 1, -magnitude, magnitude)


_E2M1 = e2m1_values()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """fp32 values of MXFP4 codes ``packed [..., n]`` (int8/uint8) as ``[..., 2n]``: low nibble first."""
    codes = packed.view(torch.uint8)
    pairs = torch.stack([codes & 0xF, codes >> 4], dim=-1).long()
    return _E2M1[pairs].flatten(-2)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], first_row: int = 0,
               first_col: int = 0) -> torch.Tensor:
    """fp32 values of a quantised ``weight [..., m, n]`` (FP8, or already unpacked FP4 values) cut from a larger
    matrix at ``(first_row, first_col)``.

    ``scale [..., i, j]`` (float32 or E8M0) holds the scales of the block rows/columns the cut touches, starting
    with the block of ``first_row`` / ``first_col``. Rows and columns each look up their own block's scale, so cuts
    that start or stop inside a block and the partial blocks at the matrix edge need no special case.
    """
    rows, cols = weight.shape[-2:]
    row_block = torch.arange(first_row, first_row + rows) // block[0] - first_row // block[0]
    col_block = torch.arange(first_col, first_col + cols) // block[1] - first_col // block[1]
    assert rows == 0 or int(row_block[-1]) < scale.shape[-2], (row_block, scale.shape)
    assert cols == 0 or int(col_block[-1]) < scale.shape[-1], (col_block, scale.shape)
    scale = scale.float().index_select(-2, row_block).index_select(-1, col_block)
    return weight.float().mul_(scale)
