"""Codecs for bf16 feature tensors. Both are lossless: decoding returns the exact bf16 bits.

- ``raw``: the bf16 bytes as they are (little-endian), no compression; the baseline.
- ``bf16``: split each 16-bit value into its high-byte plane (sign, exponent, top mantissa bit: few distinct
  values in hidden states, compresses well) and its low-byte plane (mantissa noise, compresses poorly), then
  zstd the planes, high plane first. Mixing the two byte streams would hide the high bytes' redundancy.

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


def _compressor(level: int) -> "zstandard.ZstdCompressor":
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompressor() -> "zstandard.ZstdDecompressor":
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


CODECS = {codec.name: codec for codec in (RawCodec(), BytePlaneCodec())}


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
