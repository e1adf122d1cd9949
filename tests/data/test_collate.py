import pytest
import torch

from dspark.data.collate import collate


def _sample(num_tokens, L=2, H=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 100, (num_tokens,), generator=g),
        "loss_mask": torch.rand(num_tokens, generator=g) > 0.3,
        "features_TLH": torch.randn(num_tokens, L, H, generator=g).to(torch.bfloat16),
        "final_TH": torch.randn(num_tokens, H, generator=g).to(torch.bfloat16),
    }


def test_right_padding_and_truncation():
    samples = [_sample(5, seed=0), _sample(3, seed=1), _sample(8, seed=2)]
    batch = collate(samples, max_seq_len=6)
    assert batch["input_ids_BT"].shape == (3, 6) and batch["input_ids_BT"].dtype == torch.long
    assert batch["loss_mask_BT"].dtype == torch.bool
    assert batch["features_BTLH"].shape == (3, 6, 2, 4) and batch["features_BTLH"].dtype == torch.float32
    assert batch["final_BTH"].shape == (3, 6, 4) and batch["final_BTH"].dtype == torch.float32
    for b, (sample, n) in enumerate(zip(samples, [5, 3, 6])):
        assert torch.equal(batch["input_ids_BT"][b, :n], sample["input_ids"][:n])
        assert torch.equal(batch["loss_mask_BT"][b, :n], sample["loss_mask"][:n])
        assert torch.equal(batch["features_BTLH"][b, :n], sample["features_TLH"][:n].float())
        assert torch.equal(batch["final_BTH"][b, :n], sample["final_TH"][:n].float())
        # Padding: never supervised, zero ids and features.
        assert not batch["loss_mask_BT"][b, n:].any()
        assert not batch["input_ids_BT"][b, n:].any() and not batch["features_BTLH"][b, n:].any()
        assert not batch["final_BTH"][b, n:].any()


def test_short_batch_pads_only_to_longest_and_accepts_uint8_masks():
    samples = [_sample(2, seed=3), _sample(4, seed=4)]
    samples[0]["loss_mask"] = samples[0]["loss_mask"].to(torch.uint8)
    batch = collate(samples, max_seq_len=512)
    assert batch["input_ids_BT"].shape == (2, 4)
    expected_mask = torch.cat([samples[0]["loss_mask"].bool(), torch.zeros(2, dtype=torch.bool)])
    assert torch.equal(batch["loss_mask_BT"][0], expected_mask)


def test_bad_samples():
    with pytest.raises(ValueError, match="at least one sample"):
        collate([], max_seq_len=8)
    bad = _sample(4)
    del bad["final_TH"]
    with pytest.raises(ValueError, match="sample 0 lacks final_TH"):
        collate([bad], max_seq_len=8)
    bad = _sample(4)
    bad["loss_mask"] = bad["loss_mask"][:3]
    with pytest.raises(ValueError, match="sample 0: token counts disagree"):
        collate([bad], max_seq_len=8)
    with pytest.raises(ValueError, match=r"sample 1: .* do not match sample 0's \[T, 2, 4\]"):
        collate([_sample(3), _sample(3, H=8)], max_seq_len=8)
