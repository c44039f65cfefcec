"""One (epsilon, delta) for everything a run releases of private data (docs/privacy.md).

A private run makes a fixed list of releases, each a Gaussian mechanism whose noise multiplier z is the
noise's standard deviation over the release's L2 sensitivity:
- "statistics": every client's feature statistics, once (privacy.py private_feature_stats);
- "moments": where model.modes > 1 and the run has no public images, every client's per-class moment
  sums of its pooled images, once, from which the server fits the class modes (privacy.py
  private_moment_sums).
The budget splits the run's privacy.epsilon between them (privacy.split: the moments' share of 1/z^2,
the quantity Gaussian releases add up in) and the reported epsilon is dp-accounting's composition of
every release (its privacy-loss-distribution accountant). A release that is not in the budget cannot
run: Budget.z refuses it. Everything after the releases (the warm start, the modes, every round's
training and mask) is post-processing and costs nothing more.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from prismfl.errors import ConfigError, PrismError


def noise_multiplier(epsilon: float, delta: float) -> float:
    """The smallest z such that the Gaussian mechanism with sensitivity 1 and noise std z is
    (epsilon, delta)-DP for one release: dp-accounting's analytic calibration (Balle & Wang 2018),
    exact for a single Gaussian release."""
    if not epsilon > 0:
        raise ConfigError(f"privacy.epsilon must be > 0 (or inf for no privacy), got {epsilon}")
    if not 0 < delta < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {delta}")
    if math.isinf(epsilon):
        return 0.0
    import dp_accounting

    try:
        with np.errstate(all="ignore"):  # extreme (epsilon, delta) overflow inside the search; z is checked below
            z = float(dp_accounting.get_sigma_gaussian(epsilon, delta))
    except Exception as exc:  # noqa: BLE001 - the accountant's failures all mean "cannot meet this"
        raise ConfigError(f"no Gaussian noise meets epsilon={epsilon}, delta={delta}: {exc}") from None
    if not math.isfinite(z) or z <= 0:
        raise ConfigError(f"no Gaussian noise meets epsilon={epsilon}, delta={delta}")
    return z


def spent_epsilon(z: float, delta: float) -> float:
    """Epsilon of one Gaussian release with noise multiplier z at `delta`."""
    if z == 0:
        return math.inf
    import dp_accounting

    with np.errstate(all="ignore"):  # as in noise_multiplier: the accountant's own log-space edge cases
        return float(dp_accounting.get_epsilon_gaussian(z, delta))


def composed_epsilon(noise: list[float], delta: float) -> float:
    """Epsilon at `delta` of the Gaussian releases with these noise multipliers, composed: one release is
    dp-accounting's analytic Gaussian; several, its privacy-loss-distribution (PLD) accountant."""
    if any(z == 0 for z in noise):
        return math.inf
    if len(noise) == 1:
        return spent_epsilon(noise[0], delta)
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant()
    for z in noise:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class Budget:
    """A private run's releases and the guarantee they compose to."""

    epsilon: float  # the composition of every release (composed_epsilon)
    delta: float
    noise: dict  # release name -> its noise multiplier z

    def z(self, release: str) -> float:
        """The noise multiplier of `release`; a PrismError for a release this run did not budget."""
        if release not in self.noise:
            raise PrismError(f"the {release!r} release is not in this run's privacy budget (it holds "
                             f"{', '.join(self.noise)}): it cannot run unaccounted")  # fmt: skip
        return self.noise[release]


def releases(cfg) -> tuple[str, ...]:
    """The private releases a run of `cfg` makes (module docstring)."""
    moments = cfg.model.modes > 1 and not cfg.public_images()
    return ("statistics", "moments") if moments else ("statistics",)


def budget(cfg) -> Budget | None:
    """The budget of a run of `cfg`: None without privacy."""
    p = cfg.privacy
    if math.isinf(p.epsilon):
        return None
    return _budget(p.epsilon, p.delta, p.split, releases(cfg))


@functools.lru_cache(maxsize=32)
def _budget(epsilon: float, delta: float, split: float, names: tuple[str, ...]) -> Budget:
    z = noise_multiplier(epsilon, delta)  # one Gaussian release of this z meets (epsilon, delta) exactly
    shares = {"statistics": 1.0} if len(names) == 1 else {"statistics": 1.0 - split, "moments": split}
    noise = {name: z / math.sqrt(shares[name]) for name in names}  # their 1/z^2 add up to 1/z^2
    return Budget(composed_epsilon(list(noise.values()), delta), delta, noise)
