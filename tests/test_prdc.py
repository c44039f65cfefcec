"""PRDC (Naeem et al. 2020) against a brute-force transcription of the definitions, and sanity cases."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from prismfl.errors import ConfigError
from prismfl.eval.prdc import knn_radii, prdc


def _brute(real, fake, k):
    """The four definitions, one point at a time, from a full distance matrix."""
    rr, ff, rf = cdist(real, real), cdist(fake, fake), cdist(real, fake)
    r_real = np.array([np.sort(row)[k] for row in rr])  # index 0 is the point itself
    r_fake = np.array([np.sort(row)[k] for row in ff])
    n, m = len(real), len(fake)
    precision = sum(any(rf[i, j] <= r_real[i] for i in range(n)) for j in range(m)) / m
    recall = sum(any(rf[i, j] <= r_fake[j] for j in range(m)) for i in range(n)) / n
    density = sum(sum(rf[i, j] <= r_real[i] for i in range(n)) for j in range(m)) / (k * m)
    coverage = sum(rf[i].min() <= r_real[i] for i in range(n)) / n
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def _line(*xs):
    """Points on a line, embedded in 3-D (integer coordinates: every distance is exact)."""
    return np.array([[x, 0.0, 0.0] for x in xs])


def test_hand_checked_case():
    # real 0, 2, 20, 22: each one's nearest neighbour is 2 away (k = 1 radius 2)
    # fake 1, 3, 30, 31: radii 2, 2, 1, 1
    # precision: 1 and 3 lie in real balls, 30 and 31 do not            -> 2/4
    # density: 1 lies in the balls of 0 and 2, 3 in the ball of 2 only  -> 3/(1*4)
    # recall: 0 and 2 lie in the ball of fake 1; 20 and 22 in none       -> 2/4
    # coverage: nearest fake of 0 and 2 is 1 away (<= 2); of 20, 22 is 8+ -> 2/4
    out = prdc(_line(0, 2, 20, 22), _line(1, 3, 30, 31), k=1)
    assert out == {"precision": 0.5, "recall": 0.5, "density": 0.75, "coverage": 0.5, "k": 1, "n_real": 4, "n_fake": 4}
    assert out == {**_brute(_line(0, 2, 20, 22), _line(1, 3, 30, 31), 1), "k": 1, "n_real": 4, "n_fake": 4}
    # the balls are closed: a fake point exactly on the radius (4 is 2 from real 2) counts
    assert prdc(_line(0, 2, 20, 22), _line(4, 50, 60, 70), k=1)["precision"] == 0.25


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_brute_force_across_blocks(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(41, 6))
    fake = rng.normal(0.4, 1.3, size=(29, 6))
    out = prdc(real, fake, k=k, block=7)  # several blocks, the last one partial
    ref = _brute(real, fake, k)
    for key in ref:
        assert out[key] == pytest.approx(ref[key], abs=1e-12), key
    assert np.allclose(knn_radii(real, k, block=5), [np.sort(r)[k] for r in cdist(real, real)])


def test_identical_sets_are_perfect():
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    out = prdc(x, x.copy())
    assert out["precision"] == out["recall"] == out["coverage"] == 1.0
    assert 0.9 < out["density"] < 1.6  # each point lies in its own ball and in those of nearby points


def test_far_apart_sets_score_zero():
    rng = np.random.default_rng(1)
    out = prdc(rng.normal(size=(100, 4)), rng.normal(size=(80, 4)) + 1000.0)
    assert out["precision"] == out["recall"] == out["density"] == out["coverage"] == 0.0


def test_mode_dropping_shows_in_recall_and_coverage_not_precision():
    rng = np.random.default_rng(2)
    real = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 20])
    half = rng.normal(size=(600, 2))  # generates only the first mode
    out = prdc(real, half)
    assert out["precision"] > 0.9 and out["recall"] < 0.6 and out["coverage"] < 0.6


@pytest.mark.parametrize(
    "real,fake,k,msg",
    [
        (np.zeros((10, 3)), np.zeros((10, 4)), 5, "one width"),
        (np.zeros((5, 3)), np.zeros((10, 3)), 5, "more than 5"),
        (np.zeros((10, 3)), np.zeros((10, 3)), 0, "k >= 1"),
        (np.full((10, 3), np.nan), np.zeros((10, 3)), 5, "non-finite"),
    ],
)
def test_bad_inputs(real, fake, k, msg):
    with pytest.raises(ConfigError, match=msg):
        prdc(real, fake, k=k)
