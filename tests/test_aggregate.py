import math

import numpy as np
import pytest
import torch

from prismfl import bits
from prismfl.fl import aggregate


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 12345])
def test_pack_round_trip_and_exact_size(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    payload = bits.pack_mask(mask)
    assert len(payload) == math.ceil(n / 8) == bits.packed_size(n)
    assert torch.equal(bits.unpack_mask(payload, n), mask)


def test_pack_exact_bytes():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert bits.pack_mask(mask) == bytes([0b1000_0001, 0b0000_0011])


def test_unpack_rejects_bad_input():
    with pytest.raises(ValueError, match="needs 2 bytes"):
        bits.unpack_mask(b"\x00", 10)
    with pytest.raises(ValueError, match="padding"):
        bits.unpack_mask(bytes([0, 0b1000_0000]), 10)


def aggregate_masks(masks, smoothing):
    return aggregate.aggregate_scores(aggregate.count_masks(masks), len(masks), smoothing)


def mada_update(old, new, gen):
    lam = aggregate.mada_lambda(old, new, gen)
    return aggregate.blend(old, new, lam), lam


def test_aggregate_masks_hand_computed():
    masks = [torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.tensor([1, 0, 0, 1], dtype=torch.bool)]
    assert aggregate.count_masks(masks).tolist() == [2, 1, 0, 1]
    # each bit -> 0.01 / 0.99, averaged: [0.99, 0.5, 0.01, 0.5]
    theta = torch.sigmoid(aggregate_masks(masks, 0.01).double())
    assert theta.tolist() == pytest.approx([0.99, 0.5, 0.01, 0.5], abs=1e-6)
    assert aggregate_masks(masks, 0.01)[1].item() == pytest.approx(0.0, abs=1e-6)
    assert aggregate_masks(masks, 0.01)[0].item() == pytest.approx(math.log(99), rel=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        aggregate.count_masks([])


def test_hamming_distance():
    a = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert aggregate.hamming_distance(a, b) == 0.5
    with pytest.raises(ValueError):
        aggregate.hamming_distance(a, b[:3])


def test_mada_hand_computed():
    # scores at +-20 make both sampled masks deterministic: old = [1,1,1,1], new = [1,0,0,1] -> lambda = 0.5
    old = torch.tensor([20.0, 20.0, 20.0, 20.0])
    new = torch.tensor([20.0, -20.0, -20.0, 20.0])
    blended, lam = mada_update(old, new, torch.Generator().manual_seed(0))
    assert lam == 0.5
    assert blended.tolist() == pytest.approx([20.0, 0.0, 0.0, 20.0])


def test_mada_identical_aggregate_does_not_move():
    s = torch.tensor([30.0, -30.0] * 50)
    blended, lam = mada_update(s, s.clone(), torch.Generator().manual_seed(0))
    assert lam == 0.0 and torch.equal(blended, s)


def test_sample_mask_frequency():
    scores = torch.full((200_000,), math.log(0.2 / 0.8))
    m = aggregate.sample_mask(scores, torch.Generator().manual_seed(0))
    assert abs(m.float().mean().item() - 0.2) < 0.005
    assert np.array_equal(m.numpy(), aggregate.sample_mask(scores, torch.Generator().manual_seed(0)).numpy())


def test_entropy_bits_hand_computed():
    scores = torch.tensor([0.0, 0.0, float(torch.log(torch.tensor(3.0)))])  # p = 0.5, 0.5, 0.75
    mask = torch.tensor([True, False, False])
    # 1 + 1 + -log2(0.25) = 4 bits
    assert abs(aggregate.cross_entropy_bits(mask, scores) - 4.0) < 1e-6  # float32 ln 3
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert aggregate.binary_entropy_bits(scores) == pytest.approx((1 + 1 + h) / 3, rel=1e-6)
