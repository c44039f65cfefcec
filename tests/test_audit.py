"""The canary audit of the private release (prismfl/audit.py): its bound by hand, its power on a
mechanism that adds too little noise, and the real release staying under its claimed epsilon."""

import math

import numpy as np
import pytest
from scipy.stats import beta

from prismfl.audit import audit, canary_scores, epsilon_lower_bound
from prismfl.errors import PrismError


def test_the_lower_bound_by_hand():
    # perfectly separated scores: the first half picks a threshold in (0, 1] (no false positive), and the
    # second half's 10 trials each way give Clopper-Pearson bounds in closed form at 97.5% each
    out, inn = np.zeros(20), np.ones(20)
    got = epsilon_lower_bound(out, inn, delta=1e-5, confidence=0.95)
    tpr_low = 0.025 ** (1 / 10)  # 10 of 10 positives
    fpr_up = 1 - 0.025 ** (1 / 10)  # 0 of 10 false positives
    assert 0.0 < got.threshold <= 1.0
    assert got.tpr_lower == pytest.approx(tpr_low) and got.fpr_upper == pytest.approx(fpr_up)
    assert got.lower_bound == pytest.approx(math.log((tpr_low - 1e-5) / fpr_up))
    # scores that say nothing give no bound
    same = np.arange(40.0) % 7
    assert epsilon_lower_bound(same, same.copy(), delta=1e-5).lower_bound == 0.0


def test_one_false_positive_uses_the_beta_quantile():
    out = np.array([0.0] * 10 + [0.0] * 9 + [2.0])  # second half: one score above the threshold
    inn = np.array([2.0] * 20)
    got = epsilon_lower_bound(out, inn, delta=1e-5)
    assert got.fpr_upper == pytest.approx(beta.ppf(0.975, 2, 9))


def test_the_scores_are_seeded_and_centred_without_the_canary():
    a = canary_scores(200, epsilon=4.0, delta=1e-5, seed=3)
    b = canary_scores(200, epsilon=4.0, delta=1e-5, seed=3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    out, inn = a
    # the projection of the noise on a unit vector: mean 0 without the canary, mean = sensitivity with it,
    # std = z x sensitivity (z = 1.0812 at (4, 1e-5), sensitivity sqrt(5) for 2 layers)
    std = 1.0812 * math.sqrt(5)
    assert abs(out.mean()) < 4 * std / math.sqrt(200) and abs(out.std() / std - 1) < 0.15
    assert abs(inn.mean() - math.sqrt(5)) < 4 * std / math.sqrt(200)


def test_the_release_stays_under_its_claim_and_the_audit_catches_one_that_does_not():
    # with n trials in the bound's half, no audit can show more than about log(n / 3.7): 4.4 here
    honest = audit(600, epsilon=4.0, delta=1e-5)
    assert 0.2 < honest.lower_bound < 4.0  # some power, and no leak beyond the claim
    leaky = audit(600, epsilon=2.0, delta=1e-5, release_epsilon=40.0)  # calibrated for 40, claiming 2
    assert leaky.lower_bound > 2.0


def test_the_secure_sum_stays_under_its_claim():
    got = audit(300, epsilon=2.0, delta=1e-5, secagg=3)
    assert got.lower_bound < 2.0
    leaky = audit(300, epsilon=2.0, delta=1e-5, secagg=3, release_epsilon=40.0)
    assert leaky.lower_bound > 2.0


def test_bad_requests_are_refused():
    with pytest.raises(PrismError, match="trials"):
        canary_scores(0, epsilon=1.0, delta=1e-5)
    with pytest.raises(PrismError, match="at least 4 trials"):
        epsilon_lower_bound(np.zeros(2), np.zeros(2), 1e-5)


def test_cli_audit(run_cli):
    code, out, _ = run_cli("privacy", "--epsilon", "4", "--layers", "2", "--audit", "200")
    assert code == 0 and "audit            epsilon >= " in out and "200 trials" in out
    code, _, err = run_cli("privacy", "--epsilon", "4", "--audit", "-1")
    assert code != 0 and "--audit" in err
