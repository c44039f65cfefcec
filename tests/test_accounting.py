"""One (epsilon, delta) for every private release of a run (prismfl/accounting.py): the budget's split,
the composition against a hand-composed case, a release outside the budget refused; the modes' moment
sums released under it (privacy.private_moment_sums), end to end in a run without public images."""

import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest

from conftest import needs_fmnist
from prismfl import accounting, privacy
from prismfl.config import load_config
from prismfl.data import modes as modes_mod
from prismfl.errors import PrismError
from prismfl.fl import simulate
from prismfl.fl.client import moments_message, moments_of_message

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
NO_PUBLIC_MODES = ["partition.public_holdout=0", "model.conditional=true", "model.modes=2", "train.batch_size=40"]
QUIET = {"log": lambda *_: None}


def test_two_gaussian_releases_compose_as_one_of_the_combined_noise():
    """Hand-composed: Gaussian releases of noise multipliers 3 and 6 are, together, one Gaussian release
    of z = (1/9 + 1/36)^(-1/2) = 2.6833 (their privacy-loss distributions are Gaussians whose means add);
    the accountant's composition must give that release's epsilon."""
    z = (1 / 9 + 1 / 36) ** -0.5
    assert z == pytest.approx(2.683282, rel=1e-6)
    want = dp_accounting.get_epsilon_gaussian(z, 1e-5)
    assert accounting.composed_epsilon([3.0, 6.0], 1e-5) == pytest.approx(want, rel=1e-4)
    assert accounting.composed_epsilon([3.0], 1e-5) == dp_accounting.get_epsilon_gaussian(3.0, 1e-5)
    assert accounting.composed_epsilon([3.0, 0.0], 1e-5) == math.inf


@pytest.mark.parametrize("eps", [0.2, 1.0, 10.0])
def test_the_budget_splits_epsilon_between_the_statistics_and_the_moments(eps):
    cfg = load_config(SMOKE, [*NO_PUBLIC_MODES, f"privacy.epsilon={eps}", "privacy.split=0.25"])
    plan = accounting.budget(cfg)
    z = privacy.noise_multiplier(eps, 1e-5)
    assert plan.noise == pytest.approx({"statistics": z / math.sqrt(0.75), "moments": z / math.sqrt(0.25)})
    assert plan.epsilon == pytest.approx(eps, rel=1e-3)  # the composition spends what the config asks
    # with a public hold-out the modes come from public images: one release, the whole budget
    one = accounting.budget(load_config(SMOKE, [f"privacy.epsilon={eps}", "model.conditional=true"]))
    assert one.noise == {"statistics": z} and one.epsilon == pytest.approx(eps, rel=1e-6)
    assert accounting.budget(load_config(SMOKE)) is None


def test_a_release_outside_the_budget_cannot_run():
    plan = accounting.budget(load_config(SMOKE, ["privacy.epsilon=1"]))
    with pytest.raises(PrismError, match="'moments' release is not in this run's privacy budget"):
        plan.z("moments")


def test_the_moment_release_clips_and_adds_the_budgeted_noise():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 128, size=(50, 1, 28, 28)).astype(np.uint8)  # norms about 3.6: not clipped
    images[0] = 255  # pooled norm 14 = sqrt(196): clipped to 7
    labels = np.arange(50) % 3
    got = privacy.private_moment_sums(images, labels, 4, 2.0, scale=1 / 255, generator=np.random.default_rng(7))
    clip = 0.5 * math.sqrt(196)
    exact = modes_mod.moment_sums(images, labels, 4, 1 / 255, clip=clip)
    x0 = modes_mod.pooled_pixels(images[:1], 1 / 255)[0]
    assert np.linalg.norm(x0) == pytest.approx(14.0)
    # the clipped image adds x0 * 7/14 to class 0
    unclipped = modes_mod.moment_sums(images[1:], labels[1:], 4, 1 / 255)
    assert np.allclose(exact["sums"][0], unclipped["sums"][0] + x0 / 2)
    # the noise: the same draws, in the same order, at std 2 sqrt(3) in units of (1, C, C^2)
    draw = np.random.default_rng(7)
    lower = np.tril(draw.standard_normal((4, 196, 196)))
    std = 2.0 * math.sqrt(3)
    assert np.array_equal(got["counts"], exact["counts"] + std * draw.standard_normal(4))
    assert np.array_equal(got["sums"], exact["sums"] + std * clip * draw.standard_normal((4, 196)))
    assert np.array_equal(got["outer"], exact["outer"] + std * clip**2 * (lower + np.tril(lower, -1).swapaxes(1, 2)))
    assert np.array_equal(got["outer"], got["outer"].swapaxes(1, 2))  # symmetric: its lower triangle is released
    # over the wire: every class travels (which a client holds is private), negative noisy sums accepted
    # only as a private release, and nothing non-finite or beyond +-2^40
    blob = moments_message(got)
    back = moments_of_message(blob, 4, 196, private=True)
    assert all(np.array_equal(back[k], got[k]) for k in got)
    with pytest.raises(ValueError):
        moments_of_message(blob, 4, 196)
    with pytest.raises(ValueError, match="finite"):
        moments_of_message(moments_message({**got, "sums": got["sums"] * 2.0**45}), 4, 196, private=True)


@needs_fmnist
def test_a_private_run_with_modes_from_the_clients_states_the_composed_epsilon(tmp_path):
    cfg = load_config(SMOKE, [*NO_PUBLIC_MODES, "privacy.epsilon=8", "train.rounds=1", "train.sample_every=0"])
    out = simulate.train(cfg, tmp_path / "run", **QUIET)
    plan = accounting.budget(cfg)
    assert set(plan.noise) == {"statistics", "moments"}
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["epsilon"] == pytest.approx(plan.epsilon, rel=1e-9) and plan.epsilon == pytest.approx(8, rel=1e-3)
    with pytest.raises(PrismError, match="cannot resume"):
        simulate.train(cfg, out, resume=True, **QUIET)
