"""Fréchet distance (the formula behind FID) against closed forms for Gaussians."""

import numpy as np
import pytest
from scipy.stats import special_ortho_group

from prismfl.eval.metrics import fid_from_features, frechet_distance, gaussian_stats


def _closed_form_diag(mu1, s1, mu2, s2):
    """Fréchet distance of N(mu1, diag s1) and N(mu2, diag s2)."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2))


MU1, S1 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 4.0, 0.25, 2.0])
MU2, S2 = np.array([1.0, 1.0, 0.0, -0.5]), np.array([9.0, 1.0, 0.25, 0.5])
EXPECTED = 1 + 0 + 4 + 1 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0 + (np.sqrt(2) - np.sqrt(0.5)) ** 2  # = 11.5


def test_closed_form_on_parameters():
    assert EXPECTED == pytest.approx(11.5)
    assert _closed_form_diag(MU1, S1, MU2, S2) == pytest.approx(EXPECTED)
    assert frechet_distance(MU1, np.diag(S1), MU2, np.diag(S2)) == pytest.approx(EXPECTED, abs=1e-9)
    assert frechet_distance(MU2, np.diag(S2), MU1, np.diag(S1)) == pytest.approx(EXPECTED, abs=1e-9)
    assert frechet_distance(MU1, np.diag(S1), MU1, np.diag(S1)) == pytest.approx(0.0, abs=1e-9)


def test_closed_form_survives_a_common_rotation():
    """Rotating both Gaussians alike (full, non-diagonal covariances) leaves the distance unchanged."""
    rot = special_ortho_group.rvs(4, random_state=0)
    c1, c2 = rot @ np.diag(S1) @ rot.T, rot @ np.diag(S2) @ rot.T
    assert frechet_distance(rot @ MU1, c1, rot @ MU2, c2) == pytest.approx(EXPECTED, abs=1e-8)


def test_two_draws_of_one_gaussian_are_near_zero():
    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]])
    a = rng.multivariate_normal([1.0, -1.0, 0.0], cov, size=20000)
    b = rng.multivariate_normal([1.0, -1.0, 0.0], cov, size=20000)
    same = fid_from_features(a, b)
    assert 0.0 <= same < 0.01
    assert fid_from_features(a, b + [0.5, 0.0, 0.0]) == pytest.approx(0.25, abs=0.02)  # a shift of 0.5 costs 0.25


def test_sampled_features_match_the_closed_form():
    rng = np.random.default_rng(1)
    a = rng.normal(MU1, np.sqrt(S1), size=(50000, 4))
    b = rng.normal(MU2, np.sqrt(S2), size=(50000, 4))
    assert fid_from_features(a, b) == pytest.approx(EXPECTED, rel=0.02)
    mu, cov = gaussian_stats(a)
    assert np.allclose(mu, MU1, atol=0.05) and np.allclose(np.diag(cov), S1, rtol=0.05)


def test_rank_deficient_covariances_stay_finite():
    """Fewer samples than dimensions: singular covariances, the regularised square root still answers."""
    rng = np.random.default_rng(2)
    value = fid_from_features(rng.normal(size=(5, 16)), rng.normal(size=(5, 16)))
    assert np.isfinite(value) and value > 0
