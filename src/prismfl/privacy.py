"""Differential privacy by private statistics: each client releases its feature statistics once,
through the Gaussian mechanism, and everything after that is post-processing (docs/privacy.md).

Per image x and feature layer l, let u_l = clip(phi_l(x), C_l) (L2 clipping). The client releases
the noisy sum over its images of the vector

    r(x) = [u_1/C_1, ..., u_L/C_L, (u_1/C_1)^2, ..., (u_L/C_L)^2, 1]

Every block has L2 norm at most 1 (squaring elementwise cannot raise a vector of norm <= 1 above
norm 1), so adding or removing one image moves the sum by at most sqrt(2L + 1) in L2: the
sensitivity. Gaussian noise of standard deviation z * sqrt(2L + 1) on every coordinate, with z
calibrated by dp-accounting (the analytic Gaussian mechanism), gives (epsilon, delta)-DP for one release. Means,
second moments and variances are then computed from the noisy sums and the noisy count.

The noise is drawn from the operating system's entropy, never from the run seed: anyone who knows
the seed could otherwise regenerate and subtract it.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from prismfl.errors import ConfigError
from prismfl.loss.matching import FeatureStats, feature_sums, stats_from_sums


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

    return float(dp_accounting.get_epsilon_gaussian(z, delta))


@dataclass
class PrivateRelease:
    """What a client published: the statistics, and the parameters needed to state the guarantee."""

    stats: FeatureStats
    epsilon: float  # spent, by the accountant, for this one release
    delta: float
    noise_multiplier: float  # z, relative to sensitivity
    sensitivity: float  # L2, in clip-normalised units: sqrt(2L + 1)
    clip: list[float]  # C_l per feature layer

    def summary(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sensitivity": self.sensitivity, "noise_std": self.noise_multiplier * self.sensitivity,
                "clip": self.clip}  # fmt: skip


def clip_rows(f: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale each row to L2 norm at most `bound`."""
    norms = f.norm(dim=1, keepdim=True)
    return f * torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)


@torch.no_grad()
def clip_bounds(extract, reference: torch.Tensor, multiplier: float) -> list[float]:
    """C_l = multiplier x median L2 norm of layer l's features on reference images that are not private."""
    feats = extract(reference)
    return [multiplier * float(f.double().norm(dim=1).median()) for f in feats]


@torch.no_grad()
def private_feature_stats(
    extract,
    images: torch.Tensor,
    clip: list[float],
    epsilon: float,
    delta: float,
    *,
    generator: torch.Generator | None = None,
    batch: int = 500,
) -> PrivateRelease:
    """Release a client's feature statistics with (epsilon, delta)-DP (module docstring)."""
    z = noise_multiplier(epsilon, delta)
    n_layers = len(clip)
    sensitivity = math.sqrt(2 * n_layers + 1)
    if z * sensitivity >= len(images):
        raise ConfigError(
            f"privacy.epsilon={epsilon} is out of reach for a client with {len(images)} images: the noise "
            f"(std {z * sensitivity:.0f} per coordinate) would exceed the whole signal; raise epsilon or delta"
        )

    def clip_and_scale(feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != n_layers:
            raise ValueError(f"{n_layers} clip bounds for {len(feats)} feature layers")
        return [clip_rows(f, c) / c for f, c in zip(feats, clip)]

    sums, squares = feature_sums(extract, images, batch, clip_and_scale)  # in clip units
    count = torch.tensor(float(len(images)), dtype=torch.float64)
    if z > 0:
        gen = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))
        std = z * sensitivity

        def noisy(t: torch.Tensor) -> torch.Tensor:
            return t + std * torch.randn(t.shape, generator=gen, dtype=torch.float64)

        sums, squares, count = [noisy(s) for s in sums], [noisy(q) for q in squares], noisy(count)
    n = count.clamp_min(1.0)
    stats = stats_from_sums([c * s for s, c in zip(sums, clip)], [c * c * q for q, c in zip(squares, clip)], n)
    return PrivateRelease(stats, spent_epsilon(z, delta), delta, z, sensitivity, clip)


class Private:
    """Wraps a method (fl.methods): its clients release their statistics with (epsilon, delta)-DP
    instead of exactly; everything else is the wrapped method's, and is post-processing."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def release(self, ctx, images: torch.Tensor) -> tuple[FeatureStats, dict]:
        p = ctx.cfg.privacy
        release = private_feature_stats(lambda x: ctx.extract(x.to(ctx.device)), images, ctx.privacy_clip(),
                                        p.epsilon, p.delta)  # fmt: skip
        return release.stats, release.summary()
