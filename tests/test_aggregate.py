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


def test_stratified_uniforms_put_a_rounds_clients_in_different_strata():
    from prismfl.fl.aggregate import stratified_uniforms

    k, n = 5, 20000
    us = [stratified_uniforms(n, slot, k, torch.Generator().manual_seed(3)) for slot in range(k)]
    strata = torch.stack([(u * k).floor().long() for u in us])
    assert torch.equal(strata.sort(0).values, torch.arange(k)[:, None].expand(k, n))  # one client per stratum
    for u in us:  # alone, each client's draw is uniform on [0, 1)
        assert 0 <= float(u.min()) and float(u.max()) < 1
        assert abs(float((u < 0.3).float().mean()) - 0.3) < 0.015
    p = torch.full((n,), 0.37)
    counts = torch.stack([u < p for u in us]).sum(0)
    assert set(counts.unique().tolist()) <= {1, 2}  # floor(5 x 0.37) or ceil: not Binomial(5, 0.37)
    assert abs(float(counts.float().mean()) / k - 0.37) < 0.01  # and unbiased
    with pytest.raises(ValueError, match="slot 5 is not one of 5"):
        stratified_uniforms(4, 5, 5, torch.Generator())


def test_upload_uniforms_only_for_a_rounds_chosen_clients_when_stratified():
    from prismfl.config import load_config
    from prismfl.fl import task

    cfg = load_config("configs/smoke.toml", ["partition.num_clients=4", "train.client_fraction=0.5"])
    assert task.upload_uniforms(cfg, 1, 0, 10) is None  # independent by default
    cfg = load_config("configs/smoke.toml", ["partition.num_clients=4", "train.client_fraction=0.5",
                                             "train.upload_sampling=stratified"])  # fmt: skip
    chosen = task.select_clients(cfg, 1)
    other = next(k for k in range(4) if k not in chosen)
    assert task.upload_uniforms(cfg, 1, other, 10) is None
    a, b = (task.upload_uniforms(cfg, 1, k, 1000) for k in chosen)
    assert torch.equal(torch.sort(torch.stack([(a * 2).floor(), (b * 2).floor()]), 0).values[0], torch.zeros(1000))


def test_local_train_draws_its_upload_from_the_given_uniforms():
    from prismfl.config import load_config
    from prismfl.fl import task
    from prismfl.fl.client import ClientState, LocalConfig, local_train
    from prismfl.loss.features import random_cnn
    from prismfl.loss.matching import feature_stats
    from prismfl.model import masked

    cfg = load_config("configs/smoke.toml", [])
    model, net = task.build_model(cfg), random_cnn(1, 4, seed=0)
    real = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss = task.client_loss(cfg, feature_stats(net.extract, real))
    n = masked.num_maskable(model)
    u = torch.rand(n, generator=torch.Generator().manual_seed(9))
    r = local_train(model, torch.zeros(n), loss, net.extract, state=ClientState(), cfg=LocalConfig(2, 8, 0.1),
                    generator=torch.Generator().manual_seed(1), uniforms=u)  # fmt: skip
    assert torch.equal(r.mask, u < torch.sigmoid(r.scores))
