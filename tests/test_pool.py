"""Pooling the clients' private releases (privacy.pool, issue 13): the server sums the noisy sums,
each client mixes the pooled statistics into its targets. Formulas against hand-computed cases,
hostile shared sums, the config's refusals, and the end-to-end run in the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from prismfl.config import load_config
from prismfl.errors import ConfigError
from prismfl.loss.matching import FeatureStats
from prismfl.privacy import check_shared, mix_stats, pool_releases
from prismfl.safestate import StateError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
D = torch.float64


def shared(sums, squares, counts):
    return {"sums": [torch.tensor(s, dtype=D) for s in sums], "squares": [torch.tensor(q, dtype=D) for q in squares],
            "counts": torch.tensor(counts, dtype=D)}  # fmt: skip


def test_unconditional_pool_is_the_sum_of_sums_over_the_sum_of_counts():
    # client A: 4 images, sums [8, -4], squares [20, 8]; client B: 6 images, sums [2, 6], squares [10, 12]
    a = shared([[8.0, -4.0]], [[20.0, 8.0]], [4.0])
    b = shared([[2.0, 6.0]], [[10.0, 12.0]], [6.0])
    got = pool_releases({0: a, 1: b}, num_classes=0, min_count=1)
    # mean = [10, 2] / 10 = [1, 0.2]; second = [30, 20] / 10 = [3, 2]; var = [3 - 1, 2 - 0.04]
    assert got.count == 10
    assert torch.allclose(got.mean[0], torch.tensor([1.0, 0.2]))
    assert torch.allclose(got.var[0], torch.tensor([2.0, 1.96]))


def test_per_class_pool_leaves_out_blocks_whose_noisy_count_is_under_the_threshold():
    # 3 classes; client A holds classes 0 and 1 (noisy count of class 2: 0.5), B holds class 1 (class 0: -2)
    a = shared([[[2.0], [3.0], [40.0]]], [[[4.0], [9.0], [50.0]]], [2.0, 3.0, 0.5])
    b = shared([[[-9.0], [5.0], [-7.0]]], [[[30.0], [13.0], [8.0]]], [-2.0, 5.0, 0.3])
    got = pool_releases({0: a, 1: b}, num_classes=3, min_count=1.5)
    assert got.class_counts.tolist() == [2.0, 8.0, 0.0]  # class 2: nobody above 1.5
    assert torch.allclose(got.mean[0][:, 0], torch.tensor([1.0, 1.0, 0.0]))  # [2/2, (3+5)/8, -]
    # class 1: second (9 + 13) / 8 = 2.75, var 2.75 - 1 = 1.75; class 0: 4/2 - 1 = 1
    assert torch.allclose(got.var[0][:, 0], torch.tensor([1.0, 1.75, 0.0]))
    assert got.count == 10


def test_the_pooled_noise_shrinks_as_one_over_sqrt_k_relative_to_the_signal():
    """K releases of the same true sums with noise std s: the pooled mean's error is sqrt(K) smaller."""
    gen = torch.Generator().manual_seed(0)
    k, n, s, dim = 16, 100.0, 20.0, 4000
    truth = torch.ones(dim, dtype=D)
    parts = {i: {"sums": [n * truth + s * torch.randn(dim, generator=gen, dtype=D)],
                 "squares": [n * truth + s * torch.randn(dim, generator=gen, dtype=D)],
                 "counts": torch.tensor([n], dtype=D)} for i in range(k)}  # fmt: skip
    one = pool_releases({0: parts[0]}, num_classes=0, min_count=1).mean[0].double()
    pooled = pool_releases(parts, num_classes=0, min_count=1).mean[0].double()
    ratio = float((one - 1).std() / (pooled - 1).std())
    assert abs(ratio - k**0.5) < 0.1 * k**0.5  # 4 +- 0.4


def stats(mean, var, counts=None):
    counts = None if counts is None else torch.tensor(counts, dtype=D)
    return FeatureStats([torch.tensor(mean)], [torch.tensor(var)], 0, counts)


def test_mix_weighs_means_and_second_moments():
    own, pooled = stats([2.0], [1.0]), stats([6.0], [3.0])
    got = mix_stats(own, pooled, 0.25)
    # mean 0.25*6 + 0.75*2 = 3; second 0.25*(3+36) + 0.75*(1+4) = 13.5; var 13.5 - 9 = 4.5
    assert torch.allclose(got.mean[0], torch.tensor([3.0])) and torch.allclose(got.var[0], torch.tensor([4.5]))
    assert torch.equal(mix_stats(own, pooled, 0.0).mean[0], own.mean[0])


def test_mix_per_class_own_and_all_classes():
    # classes: 0 held by both, 1 only in the pool, 2 by nobody
    own = stats([[2.0], [0.0], [0.0]], [[1.0], [0.0], [0.0]], [10.0, 0.4, -1.0])
    pooled = stats([[4.0], [5.0], [0.0]], [[1.0], [2.0], [0.0]], [30.0, 20.0, 0.0])
    mine = mix_stats(own, pooled, 0.5, min_count=1.0)
    assert mine.class_counts.tolist() == [10.0, 0.0, 0.0]  # its own class, with its own count
    assert mine.mean[0][:, 0].tolist() == [3.0, 0.0, 0.0]
    # second 0.5*(1+16) + 0.5*(1+4) = 11, var 11 - 9 = 2
    assert mine.var[0][:, 0].tolist() == [2.0, 0.0, 0.0]
    every = mix_stats(own, pooled, 0.5, all_classes=True, min_count=1.0)
    assert every.class_counts.tolist() == [30.0, 20.0, 0.0]  # the pool's counts: every client aims at one mix
    assert every.mean[0][:, 0].tolist() == [3.0, 5.0, 0.0] and every.var[0][:, 0].tolist() == [2.0, 2.0, 0.0]
    assert every.count == 50


def test_mix_refuses_pooled_statistics_of_another_shape():
    with pytest.raises(ValueError, match="do not match"):
        mix_stats(stats([1.0, 2.0], [1.0, 1.0]), stats([1.0], [1.0]), 0.5)
    with pytest.raises(ValueError, match="do not match"):
        mix_stats(stats([[1.0]], [[1.0]], [1.0]), stats([1.0], [1.0]), 0.5)


@pytest.mark.parametrize(
    "bad, why",
    [
        (shared([[1.0, 2.0, 3.0]], [[1.0, 1.0, 1.0]], [4.0]), "differ in shape"),
        (shared([[1.0, float("nan")]], [[1.0, 1.0]], [4.0]), "not finite"),
        (shared([[1.0, 2.0]], [[1.0, 1.0]], [4.0, 1.0]), "counts for 1"),
        ({"sums": [torch.zeros(2)], "squares": [torch.zeros(2, dtype=D)], "counts": torch.ones(1, dtype=D)},
         "float64"),
        ({"sums": [], "counts": torch.ones(1, dtype=D)}, "lacks 'squares'"),
    ],
)  # fmt: skip
def test_hostile_shared_sums_are_refused(bad, why):
    good = shared([[1.0, 2.0]], [[1.0, 1.0]], [4.0])
    with pytest.raises(StateError, match=why):
        pool_releases({0: good, 1: bad}, num_classes=0, min_count=1)


def test_a_first_release_with_inconsistent_shapes_is_refused():
    with pytest.raises(StateError, match="inconsistent shapes"):
        check_shared(shared([[[1.0]]], [[[1.0]]], [1.0, 2.0]), None, 2)  # one row for two classes


@pytest.mark.parametrize(
    "overrides, why",
    [
        (["privacy.pool=0.5"], "only private releases"),
        (["privacy.epsilon=1", "privacy.pool=1.5"], r"\[0, 1\]"),
        (["privacy.epsilon=1", "privacy.pool=1", 'privacy.pool_classes="all"'], "conditional"),
        (["privacy.epsilon=1", 'privacy.pool_classes="every"'], "not one of"),
    ],
)
def test_pool_settings_are_checked(overrides, why):
    with pytest.raises(ConfigError, match=why):
        load_config(SMOKE, overrides)


@needs_fmnist
def test_pooled_run_trains_every_client_against_the_pool_of_the_releases(tmp_path, monkeypatch):
    """pool = 1 over all classes: every client's targets are exactly the pool of what the clients
    released (read back from the checkpoint); the run finishes and states its epsilon."""
    from prismfl import privacy, rundir
    from prismfl.fl import simulate

    pools = []

    def spy(*args, **kwargs):
        pools.append(privacy_pool(*args, **kwargs))
        return pools[-1]

    privacy_pool = privacy.pool_releases
    monkeypatch.setattr(privacy, "pool_releases", spy)
    overrides = ["privacy.epsilon=4", "privacy.pool=1", 'privacy.pool_classes="all"', "model.conditional=true",
                 "train.batch_size=20", "train.rounds=1"]  # fmt: skip
    logs: list[str] = []
    out = simulate.train(load_config(SMOKE, overrides), tmp_path / "run", log=logs.append)
    assert len(pools) == 1 and any("pooled 3 clients' releases (per class" in line for line in logs)
    pooled = pools[0]
    held = pooled.class_counts >= privacy.min_count(rundir.load_checkpoint(out)["clients"]["clients"][0]["privacy"])
    assert int(held.sum()) == 10  # the smoke federation's 3 clients hold every class between them
    for c in rundir.load_checkpoint(out)["clients"]["clients"]:
        target = FeatureStats.from_tree(c["stats"])
        assert torch.equal(target.class_counts, torch.where(held, pooled.class_counts, 0.0))
        assert all(torch.equal(a, b) for a, b in zip(target.mean, pooled.mean))
        # the variance goes through var + mean^2 - mean^2 in float64 from float32: equal up to rounding
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(target.var, pooled.var))
    assert rundir.read_metrics(out)[-1]["epsilon"] == pytest.approx(4.0, rel=1e-6)
