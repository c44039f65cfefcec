import math

import numpy as np
import pytest
import torch

from prismfl.fl import codec, server


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 12345])
def test_pack_round_trip_and_exact_size(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    payload = codec.pack_mask(mask)
    assert len(payload) == math.ceil(n / 8) == codec.packed_size(n)
    assert torch.equal(codec.unpack_mask(payload, n), mask)


def test_pack_exact_bytes():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert codec.pack_mask(mask) == bytes([0b1000_0001, 0b0000_0011])


def test_unpack_rejects_bad_input():
    with pytest.raises(ValueError, match="needs 2 bytes"):
        codec.unpack_mask(b"\x00", 10)
    with pytest.raises(ValueError, match="padding"):
        codec.unpack_mask(bytes([0, 0b1000_0000]), 10)


def test_aggregate_masks_hand_computed():
    masks = [torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.tensor([1, 0, 0, 1], dtype=torch.bool)]
    # each bit -> 0.01 / 0.99, averaged: [0.99, 0.5, 0.01, 0.5]
    theta = torch.sigmoid(server.aggregate_masks(masks, 0.01).double())
    assert theta.tolist() == pytest.approx([0.99, 0.5, 0.01, 0.5], abs=1e-6)
    assert server.aggregate_masks(masks, 0.01)[1].item() == pytest.approx(0.0, abs=1e-6)
    assert server.aggregate_masks(masks, 0.01)[0].item() == pytest.approx(math.log(99), rel=1e-5)


def test_hamming_distance():
    a = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert server.hamming_distance(a, b) == 0.5
    with pytest.raises(ValueError):
        server.hamming_distance(a, b[:3])


def test_mada_hand_computed():
    # scores at +-20 make both sampled masks deterministic: old = [1,1,1,1], new = [1,0,0,1] -> lambda = 0.5
    old = torch.tensor([20.0, 20.0, 20.0, 20.0])
    new = torch.tensor([20.0, -20.0, -20.0, 20.0])
    blended, lam = server.mada_update(old, new, torch.Generator().manual_seed(0))
    assert lam == 0.5
    assert blended.tolist() == pytest.approx([20.0, 0.0, 0.0, 20.0])


def test_mada_identical_aggregate_does_not_move():
    s = torch.tensor([30.0, -30.0] * 50)
    blended, lam = server.mada_update(s, s.clone(), torch.Generator().manual_seed(0))
    assert lam == 0.0 and torch.equal(blended, s)


def test_sample_mask_frequency():
    scores = torch.full((200_000,), math.log(0.2 / 0.8))
    m = server.sample_mask(scores, torch.Generator().manual_seed(0))
    assert abs(m.float().mean().item() - 0.2) < 0.005
    assert np.array_equal(m.numpy(), server.sample_mask(scores, torch.Generator().manual_seed(0)).numpy())
