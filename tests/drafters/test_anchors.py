import math

import pytest
import torch

from dspark.drafters.anchors import block_labels, position_weights, sample_anchors

pytestmark = pytest.mark.usefixtures("one_thread")


def test_anchors_are_distinct_supervised_pairs_and_deterministic():
    mask = torch.zeros(3, 30, dtype=torch.bool)
    mask[0, 5:20] = True  # candidates 5..18 (14)
    mask[1, [2, 3, 10, 11, 12]] = True  # candidates 2, 10, 11
    # row 2: nothing supervised
    pos, valid = sample_anchors(mask, 8, torch.Generator().manual_seed(0))
    assert pos.shape == (3, 8) and valid.dtype == torch.bool
    assert valid.sum(1).tolist() == [8, 3, 0]
    for b in range(3):
        chosen = pos[b][valid[b]].tolist()
        assert chosen == sorted(set(chosen))  # distinct, ascending
        assert all(mask[b, a] and mask[b, a + 1] for a in chosen)
    assert pos[1][valid[1]].tolist() == [2, 10, 11]
    assert (pos[~valid] == 0).all()

    again, _ = sample_anchors(mask, 8, torch.Generator().manual_seed(0))
    other, _ = sample_anchors(mask, 8, torch.Generator().manual_seed(1))
    assert torch.equal(pos, again)
    assert not torch.equal(pos[0], other[0])


def test_anchor_count_shrinks_to_the_most_candidates_and_is_uniform():
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 2:7] = True  # candidates 2..5
    pos, valid = sample_anchors(mask, 64, torch.Generator().manual_seed(0))
    assert pos.tolist() == [[2, 3, 4, 5]] and valid.all()
    # One anchor out of four candidates, many draws: each candidate about a quarter of the time.
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(12)
    for _ in range(2000):
        p, _ = sample_anchors(mask, 1, g)
        counts[p[0, 0]] += 1
    assert counts[2:6].min() > 400 and counts.sum() == 2000

    empty, empty_valid = sample_anchors(torch.ones(2, 1, dtype=torch.bool), 4)
    assert empty.shape == (2, 1) and not empty_valid.any()
    with pytest.raises(ValueError, match="num_anchors must be >= 1, got 0"):
        sample_anchors(mask, 0)


def test_block_labels_supervise_only_the_contiguous_valid_prefix():
    T = 16
    ids = torch.arange(100, 100 + T).view(1, T)
    mask = torch.ones(1, T, dtype=torch.bool)
    mask[0, 0:2] = False  # prompt
    mask[0, 7] = False  # a hole: supervised again from 8
    anchors = torch.tensor([[2, 5, 6, 12, 0]])
    anchor_valid = torch.tensor([[True, True, True, True, False]])
    labels, valid = block_labels(ids, mask, anchors, anchor_valid, block_size=4)
    assert labels[0, 0].tolist() == [103, 104, 105, 106]
    assert valid[0, 0].tolist() == [True, True, True, True]
    assert valid[0, 1].tolist() == [True, False, False, False]  # 6 ok, 7 is the hole, 8 and 9 are cut off too
    assert valid[0, 2].tolist() == [False, False, False, False]  # label 7 unsupervised
    assert labels[0, 3].tolist() == [113, 114, 115, 0]  # 16 is out of range
    assert valid[0, 3].tolist() == [True, True, True, False]
    assert not valid[0, 4].any()  # invalid anchor


def test_position_weights():
    w = position_weights(4, 2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(-0.5), math.exp(-1.0), math.exp(-1.5)]))
    with pytest.raises(ValueError, match="loss_decay must be a positive number, got 0.0"):
        position_weights(4, 0.0)
