"""Feature codecs: lossless bf16 round trips (bit-identical), including special values."""

import pytest
import torch

from dspark.cache import codecs


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)


@pytest.mark.parametrize("name", ["raw", "bf16"])
def test_round_trip_is_bit_identical(name):
    codec = codecs.get_codec(name)
    torch.manual_seed(0)
    x_TLH = (torch.randn(37, 3, 64) * torch.logspace(-30, 30, 64)).to(torch.bfloat16)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 3.0e38])
    x_TLH.view(-1)[: special.numel()] = special.to(torch.bfloat16)
    out = codec.decode(codec.encode(x_TLH, 3), (37, 3, 64))
    assert out.dtype == torch.bfloat16 and out.shape == x_TLH.shape
    assert torch.equal(_bits(out), _bits(x_TLH))


def test_byte_planes_compress_hidden_state_like_data_better_than_raw():
    torch.manual_seed(0)
    x_TH = torch.randn(256, 128).to(torch.bfloat16)  # narrow exponent range, like real activations
    raw = codecs.get_codec("raw").encode(x_TH, 3)
    planes = codecs.get_codec("bf16").encode(x_TH, 3)
    assert len(raw) == 2 * x_TH.numel()
    assert len(planes) < 0.8 * len(raw)


def test_ids_and_mask_round_trip():
    ids_T = torch.tensor([0, 5, 49151, 2**31 - 1])
    mask_T = torch.tensor([True, False, True, True])
    assert torch.equal(codecs.decode_ids(codecs.encode_ids(ids_T), 4), ids_T)
    assert torch.equal(codecs.decode_mask(codecs.encode_mask(mask_T), 4), mask_T)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 2\*\*31\)"):
        codecs.encode_ids(torch.tensor([-1, 3]))


def test_bad_codec_level_and_blob_are_refused():
    with pytest.raises(ValueError, match="unknown cache codec 'fp4'; expected one of: bf16, fp8, raw"):
        codecs.get_codec("fp4")
    with pytest.raises(ValueError, match="zstd_level must be an integer in 1..22, got 0"):
        codecs.check_zstd_level(0)
    with pytest.raises(ValueError, match="expected 8 for shape"):
        codecs.get_codec("raw").decode(b"\x00" * 6, (2, 2))
