"""fp8 codec: error within the e4m3 bound, deterministic bits, zero rows, inf/nan refused, cache round trip.

Legend: T tokens, L feature layers, H hidden size, R rows (T * L).

Bound (see dspark.cache.codecs): e4m3 keeps 3 mantissa bits, so an element whose scaled value is normal
(|x| >= 2**-6 * scale, scale = row amax / 448) decodes within 2**-4 |x|, plus 2**-9 |x| for rounding the result
to bf16; smaller elements (e4m3 subnormals, spacing 2**-9 * scale) within 2**-10 * scale + 2**-9 |x|.
"""

import json

import pytest
import torch
from test_cache_io import H, L, make_identity, make_sample

from dspark.cache import CacheReader, CacheWriter, codecs, finalize_cache, inspect_cache

FP8 = codecs.get_codec("fp8")
NORMAL_REL_BOUND = 2**-4 + 2**-9 + 2**-12  # last term: slack for the fp32 product q * scale


def hidden_like(T: int = 41, L: int = 3, H: int = 64, seed: int = 0) -> torch.Tensor:
    """bf16 [T, L, H] with per-row magnitudes over 12 decades and an outlier channel, like real activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, L, H, generator=g) * torch.logspace(-6, 6, T)[:, None, None]
    x[:, :, 7] *= 50  # massive-activation channel
    return x.to(torch.bfloat16)


def check_bound(x: torch.Tensor, y: torch.Tensor) -> float:
    """Assert the documented bound element-wise; returns the largest relative error seen on normal elements."""
    x_RH, y_RH = x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, x.shape[-1])
    scale_R1 = x_RH.abs().amax(dim=1, keepdim=True) / 448
    err = (y_RH - x_RH).abs()
    normal = x_RH.abs() >= 2**-6 * scale_R1
    assert (err[normal] <= NORMAL_REL_BOUND * x_RH.abs()[normal]).all()
    sub_bound = 2**-10 * scale_R1 + 2**-9 * x_RH.abs()
    assert (err[~normal] <= sub_bound.expand_as(err)[~normal]).all()
    return float((err[normal] / x_RH.abs()[normal]).max())


def test_error_is_within_the_e4m3_bound_and_the_bound_is_tight():
    x = hidden_like()
    y = FP8.decode(FP8.encode(x, 3), tuple(x.shape))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    worst = check_bound(x, y)
    assert worst > 2**-5  # really 3 mantissa bits: the bound is not loose by an order of magnitude
    # Each row's largest element maps to 448 exactly, so it survives up to bf16 rounding.
    x_RH, y_RH = x.float().reshape(-1, 64), y.float().reshape(-1, 64)
    idx = x_RH.abs().argmax(dim=1, keepdim=True)
    torch.testing.assert_close(y_RH.gather(1, idx), x_RH.gather(1, idx), rtol=2**-8, atol=0)


def test_subnormal_range_and_2d_final_hidden():
    x_TH = torch.tensor([[1000.0, 1.0, 0.1, 0.01, -0.003, 1e-5, 0.0, -1000.0]]).to(torch.bfloat16)
    y_TH = FP8.decode(FP8.encode(x_TH, 1), (1, 8))
    check_bound(x_TH, y_TH)
    assert y_TH[0, 5] == 0 and y_TH[0, 6] == 0  # far below amax / 448 / 2**9: flushed to zero


def test_encode_and_decode_are_bit_deterministic():
    x = hidden_like(seed=1)
    blobs = [FP8.encode(x.clone(), level) for level in (3, 3)]
    assert blobs[0] == blobs[1]
    a, b = FP8.decode(blobs[0], tuple(x.shape)), FP8.decode(blobs[1], tuple(x.shape))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    # The zstd level changes the bytes on disk, never the decoded values.
    c = FP8.decode(FP8.encode(x, 9), tuple(x.shape))
    assert torch.equal(a.view(torch.int16), c.view(torch.int16))


def test_zero_rows_and_all_zero_tensors_decode_to_exact_zeros():
    x = hidden_like(T=6, seed=2)
    x[2] = 0  # every layer of token 2
    x[4, 1] = 0  # one layer row of token 4
    y = FP8.decode(FP8.encode(x, 3), tuple(x.shape))
    assert torch.equal(y[2], torch.zeros_like(y[2])) and torch.equal(y[4, 1], torch.zeros_like(y[4, 1]))
    check_bound(x, y)
    zeros = torch.zeros(5, 2, 16, dtype=torch.bfloat16)
    assert torch.equal(FP8.decode(FP8.encode(zeros, 3), (5, 2, 16)), zeros)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_input_is_refused(bad):
    x = hidden_like(T=4, seed=3)
    x[2, 1, 5] = bad
    with pytest.raises(ValueError, match=r"fp8 cache codec cannot encode inf/nan: 1 non-finite values in a tensor "
                                         r"of shape \[4, 3, 64\] \(first in row 7\)"):
        FP8.encode(x, 3)


def test_fp8_is_smaller_than_lossless_byte_planes():
    x = torch.randn(256, 128).to(torch.bfloat16)
    assert len(FP8.encode(x, 3)) < 0.6 * len(codecs.get_codec("bf16").encode(x, 3))
    with pytest.raises(ValueError, match=r"fp8 blob decompressed to .* bytes, expected"):
        FP8.decode(FP8.encode(x, 3), (256, 64))


def test_fp8_cache_round_trip_and_writer_names_a_non_finite_sample(tmp_path):
    identity = make_identity()
    with CacheWriter(tmp_path / "c", identity, codec="fp8", samples_per_shard=3, num_threads=2) as writer:
        for i in range(7):
            writer.add(make_sample(i))
    finalize_cache(tmp_path / "c", identity)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["codecs"]["features_TLH"] == manifest["codecs"]["final_TH"] == "fp8"
    reader = CacheReader(tmp_path / "c", expected=identity)
    for i in range(7):
        got, want = reader.get(f"s{i:03d}"), make_sample(i)
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["loss_mask"], want["loss_mask"])
        assert got["features_TLH"].shape == (want["input_ids"].numel(), L, H)
        check_bound(want["features_TLH"].to(torch.bfloat16), got["features_TLH"])
        check_bound(want["final_TH"].to(torch.bfloat16), got["final_TH"])
    info = inspect_cache(tmp_path / "c")
    # H=16 rows: 16 e4m3 bytes + a 4-byte scale per 32 raw bytes, before zstd and with ids + masks uncompressed.
    assert info["codec"] == "fp8" and info["lossless"] is False and info["ratio_vs_raw_bf16"] > 1.3, info
    assert reader.verify() == 7

    bad = make_sample(100)
    bad["final_TH"][1, 3] = float("nan")
    writer = CacheWriter(tmp_path / "d", identity, codec="fp8", samples_per_shard=2)
    writer.add(make_sample(0))
    writer.add(bad)
    with pytest.raises(ValueError, match=r"cache sample 's100': final_TH: fp8 cache codec cannot encode inf/nan"):
        writer.close()
    with pytest.raises(ValueError, match="cache.compress_threads must be an integer >= 1, got 0"):
        CacheWriter(tmp_path / "e", identity, num_threads=0)
