"""Codecs for bf16 feature tensors. ``raw`` and ``bf16`` are lossless (decoding returns the exact bf16 bits),
``fp8`` is lossy.

- ``raw``: the bf16 bytes as they are (little-endian), no compression; the baseline.
- ``bf16``: split each 16-bit value into its high-byte plane (sign, exponent, top mantissa bit: few distinct
  values in hidden states, compresses well) and its low-byte plane (mantissa noise, compresses poorly), then
  zstd the planes, high plane first. Mixing the two byte streams would hide the high bytes' redundancy.
- ``fp8``: e4m3 (``torch.float8_e4m3fn``) with one fp32 scale per row of the last dim (per token, and per
  feature layer for ``[T, L, H]``): ``scale = amax(|row|) / 448``, ``q = e4m3(row / scale)``. Error bound: e4m3
  keeps 3 mantissa bits, so an element whose scaled value is normal (``|x| >= 2**-6 * scale``) comes back
  within ``2**-4 * |x|`` (round to nearest), plus ``2**-9 * |x|`` from rounding the decoded value to bf16;
  smaller ones (e4m3 subnormals) within ``2**-10 * scale`` absolute. All-zero rows decode to exact zeros.
  inf and nan cannot be scaled and are refused. Blob: zstd of [the scales' four byte planes | the e4m3 bytes].

Also the fixed-width codecs for token ids (``int32``) and loss masks (``uint8``).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import zstandard

# zstandard compressor/decompressor objects must not be shared between threads: keep one per thread.
_local = threading.local()

_U16 = np.dtype("<u2")  # explicit little-endian so shards read the same on any host


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if getattr(_local, "decompressor", None) is None:
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def _bf16_to_u16(x: torch.Tensor) -> np.ndarray:
    assert x.dtype == torch.bfloat16 and x.device.type == "cpu"
    return x.contiguous().view(torch.int16).numpy().view(_U16).reshape(-1)


def _u16_to_bf16(values: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    # astype copies into a native-endian, writable array, which torch.from_numpy needs.
    native = values.astype(np.uint16).view(np.int16)
    return torch.from_numpy(native).view(torch.bfloat16).reshape(shape)


class RawCodec:
    """bf16 bytes, uncompressed."""

    name = "raw"
    lossless = True

    def encode(self, x: torch.Tensor, level: int) -> bytes:
        return _bf16_to_u16(x).tobytes()

    def decode(self, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        expected = 2 * int(np.prod(shape))
        if len(data) != expected:
            raise ValueError(f"raw bf16 blob has {len(data)} bytes, expected {expected} for shape {list(shape)}")
        return _u16_to_bf16(np.frombuffer(data, dtype=_U16), shape)


class BytePlaneCodec:
    """bf16 split into high and low byte planes, then zstd (lossless)."""

    name = "bf16"
    lossless = True

    def encode(self, x: torch.Tensor, level: int) -> bytes:
        values = _bf16_to_u16(x)
        planes = np.empty((2, values.size), dtype=np.uint8)
        planes[0] = values >> 8  # high bytes: sign, exponent, top mantissa bit
        planes[1] = values & 0xFF
        return _compressor(level).compress(planes.tobytes())

    def decode(self, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        count = int(np.prod(shape))
        planes = np.frombuffer(_decompressor().decompress(data, max_output_size=2 * count), dtype=np.uint8)
        if planes.size != 2 * count:
            raise ValueError(f"bf16 blob decompressed to {planes.size} bytes, expected {2 * count} for {list(shape)}")
        planes = planes.reshape(2, count).astype(np.uint16)
        return _u16_to_bf16((planes[0] << 8) | planes[1], shape)


E4M3_MAX = 448.0  # largest finite torch.float8_e4m3fn value
# float32 value of every e4m3 byte: np.take on this table decodes ~4x faster than torch's float8 -> float32 cast.
_E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


class Fp8Codec:
    """e4m3 with a per-row fp32 scale, then zstd (lossy; bound in the module docstring)."""

    name = "fp8"
    lossless = False

    def encode(self, x: torch.Tensor, level: int) -> bytes:
        x_RH = x.reshape(-1, x.shape[-1]).float()  # R = rows (tokens x layers), H = hidden
        finite = torch.isfinite(x_RH)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            row = int((~finite).any(dim=1).nonzero()[0])
            raise ValueError(
                f"fp8 cache codec cannot encode inf/nan: {bad} non-finite values in a tensor of shape "
                f"{list(x.shape)} (first in row {row}); fix the target's features or use cache.codec=bf16"
            )
        scale_R = x_RH.abs().amax(dim=1) / E4M3_MAX
        divisor_R = torch.where(scale_R > 0, scale_R, torch.ones_like(scale_R))  # all-zero rows stay zero
        # amax / (amax / 448) can round a hair above 448: clamp so the cast never saturates by accident.
        q_RH = (x_RH / divisor_R[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        scale_planes = scale_R.numpy().astype("<f4").view(np.uint8).reshape(-1, 4).T  # [4, R], low byte first
        payload = np.ascontiguousarray(scale_planes).tobytes() + q_RH.view(torch.uint8).numpy().tobytes()
        return _compressor(level).compress(payload)

    def decode(self, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        H = int(shape[-1])
        R = int(np.prod(shape[:-1]))
        expected = 4 * R + R * H
        payload = np.frombuffer(_decompressor().decompress(data, max_output_size=expected), dtype=np.uint8)
        if payload.size != expected:
            raise ValueError(f"fp8 blob decompressed to {payload.size} bytes, expected {expected} for {list(shape)}")
        scale_R = np.ascontiguousarray(payload[: 4 * R].reshape(4, R).T).view("<f4").reshape(R).astype(np.float32)
        values_RH = torch.from_numpy(np.take(_E4M3_VALUES, payload[4 * R :]).reshape(R, H))
        return (values_RH * torch.from_numpy(scale_R)[:, None]).to(torch.bfloat16).reshape(shape)


CODECS = {codec.name: codec for codec in (RawCodec(), BytePlaneCodec(), Fp8Codec())}


def get_codec(name: str):
    """The feature codec called ``name``; a ValueError lists the known ones."""
    if name not in CODECS:
        raise ValueError(f"unknown cache codec {name!r}; expected one of: {', '.join(sorted(CODECS))}")
    return CODECS[name]


def check_zstd_level(level: int) -> None:
    if not isinstance(level, int) or not 1 <= level <= 22:
        raise ValueError(f"cache.zstd_level must be an integer in 1..22, got {level!r}")


def encode_ids(ids_T: torch.Tensor) -> bytes:
    """Token ids as little-endian int32 (every real vocabulary fits)."""
    if ids_T.numel() and (int(ids_T.min()) < 0 or int(ids_T.max()) >= 2**31):
        raise ValueError(f"input_ids must lie in [0, 2**31), got range [{int(ids_T.min())}, {int(ids_T.max())}]")
    return ids_T.to(torch.int32).numpy().astype("<i4").tobytes()


def decode_ids(data: bytes, num_tokens: int) -> torch.Tensor:
    if len(data) != 4 * num_tokens:
        raise ValueError(f"input_ids blob has {len(data)} bytes, expected {4 * num_tokens}")
    return torch.from_numpy(np.frombuffer(data, dtype="<i4").astype(np.int64))


def encode_mask(mask_T: torch.Tensor) -> bytes:
    return mask_T.to(torch.uint8).numpy().tobytes()


def decode_mask(data: bytes, num_tokens: int) -> torch.Tensor:
    if len(data) != num_tokens:
        raise ValueError(f"loss_mask blob has {len(data)} bytes, expected {num_tokens}")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.bool_))
