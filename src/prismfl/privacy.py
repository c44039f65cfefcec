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
import sys
from dataclasses import dataclass, field

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
    warnings: list[str] = field(default_factory=list)  # classes the noise swamps (per-class releases)

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
    labels: torch.Tensor | None = None,
    num_classes: int = 0,
    class_names: list[str] | None = None,
    second: bool = True,
) -> PrivateRelease:
    """Release a client's feature statistics with (epsilon, delta)-DP (module docstring).

    Per class (`labels`): an image adds its vector r(x) to its own class's block of sums only, and
    its 1 to its class's count; every class's block and count is released with the same noise,
    including the classes the client does not hold (which classes it holds is private too). One image
    still moves one block by ||r(x)|| <= sqrt(2L + 1): the sensitivity is unchanged.

    `second = False` (loss.moment = "mean"): r(x) = [u_1/C_1, ..., u_L/C_L, 1], the means only, with
    sensitivity sqrt(L + 1); nothing is released about second moments (the variances are zeros)."""
    z = noise_multiplier(epsilon, delta)
    n_layers = len(clip)
    sensitivity = math.sqrt((2 if second else 1) * n_layers + 1)
    if z * sensitivity >= len(images):
        raise ConfigError(
            f"privacy.epsilon={epsilon} is out of reach for a client with {len(images)} images: the noise "
            f"(std {z * sensitivity:.0f} per coordinate) would exceed the whole signal; raise epsilon or delta"
        )

    def clip_and_scale(feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != n_layers:
            raise ValueError(f"{n_layers} clip bounds for {len(feats)} feature layers")
        return [clip_rows(f, c) / c for f, c in zip(feats, clip)]

    sums, squares = feature_sums(extract, images, batch, clip_and_scale, labels, num_classes)  # in clip units
    if labels is None:
        count = torch.tensor(float(len(images)), dtype=torch.float64)
    else:
        count = torch.bincount(labels.long(), minlength=num_classes).double()
    warnings = weak_classes(sums, count, z * sensitivity, class_names) if labels is not None else []
    if z > 0:
        gen = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))
        std = z * sensitivity

        def noisy(t: torch.Tensor) -> torch.Tensor:
            return t + std * torch.randn(t.shape, generator=gen, dtype=torch.float64)

        sums = [noisy(s) for s in sums]
        if second:
            squares = [noisy(q) for q in squares]
        count = noisy(count)
    if not second:  # not released: zero second moments give zero variances
        squares = [torch.zeros_like(q) for q in squares]
    n = count.clamp_min(1.0) if labels is None else count
    stats = stats_from_sums([c * s for s, c in zip(sums, clip)], [c * c * q for q, c in zip(squares, clip)], n)
    return PrivateRelease(stats, spent_epsilon(z, delta), delta, z, sensitivity, clip, warnings)


def weak_classes(sums: list[torch.Tensor], counts: torch.Tensor, std: float,
                 names: list[str] | None = None) -> list[str]:  # fmt: skip
    """The classes a client holds whose release the noise would swamp: for some layer, the expected
    norm of the noise on the class's summed vector (std x sqrt(D_l)) exceeds the norm of that sum.
    Computed on the exact sums, before the noise, and only shown to the client itself (a warning)."""
    out = []
    for c in range(len(counts)):
        if counts[c] < 1:
            continue
        ratio = max(std * math.sqrt(s.shape[1]) / max(float(s[c].norm()), 1e-12) for s in sums)
        if ratio > 1:
            name = f"class {c}" + (f" ({names[c]})" if names else "")
            out.append(f"{name}: {int(counts[c])} images, the privacy noise would exceed their signal "
                       f"(noise/signal x{ratio:.1f} in the worst feature layer); its statistics will be mostly "
                       f"noise: raise epsilon, or leave the class to clients that hold more of it")  # fmt: skip
    return out


class Private:
    """Wraps a method (fl.methods): its clients release their statistics with (epsilon, delta)-DP
    instead of exactly; everything else is the wrapped method's, and is post-processing."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def release(self, ctx, images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[FeatureStats, dict]:
        p = ctx.cfg.privacy
        release = private_feature_stats(lambda x: ctx.extract(x.to(ctx.device)), images, ctx.privacy_clip(),
                                        p.epsilon, p.delta, labels=labels, num_classes=self.inner.spec.num_classes,
                                        class_names=ctx.fed.class_names if ctx.fed is not None else None,
                                        second=ctx.cfg.loss.moment != "mean")  # fmt: skip
        for warning in release.warnings:
            print(f"prismfl: warning: {warning}", file=sys.stderr, flush=True)
        return release.stats, release.summary()
