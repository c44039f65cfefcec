"""An empirical audit of the private release: a canary test on the released statistics (docs/privacy.md).

The accountant proves an upper bound on epsilon; an audit measures a lower bound, by attacking the
mechanism as it is implemented. Each trial runs the real release (privacy.private_feature_stats,
with its clipping, sensitivity and noise) on a dataset D and on D plus one canary, the worst-case
record: in every layer a feature vector beyond the clip bound along one axis, so that it moves the
released sums, squares and count by exactly the sensitivity. The attacker knows D exactly and scores
a release by its projection on the canary's contribution (the most powerful test against Gaussian
noise). Thresholding the scores gives a false-positive and a true-positive rate, and any
(epsilon, delta)-DP mechanism satisfies TPR <= e^epsilon FPR + delta (and the same for the
complements), so

    epsilon >= log((TPR_lower - delta) / FPR_upper)

with Clopper-Pearson bounds. The threshold is chosen on one half of the trials and the bound is
computed on the other half, so choosing it costs no confidence. A lower bound above the claimed
epsilon means the implementation leaks more than its accountant says; one far below it says the
audit is weak, not that the mechanism is more private.

With `secagg = K`, the audit attacks what the server of privacy.secagg sees: the sum of K clients'
releases, each with its 1/sqrt(K) share of the noise, the canary in one client's data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from prismfl.errors import PrismError
from prismfl.privacy import private_feature_stats
from prismfl.secagg import flatten

MAX_TRIALS = 1_000_000


@dataclass
class Audit:
    claimed: float  # the epsilon the accountant states for the release
    delta: float
    lower_bound: float  # the audit's epsilon lower bound at `confidence`
    confidence: float
    trials: int  # releases with the canary and without it, each
    threshold: float  # the score threshold chosen on the first half of the trials
    fpr_upper: float
    tpr_lower: float


def _features(layers: int, dim: int):
    """A feature map for the audit's synthetic records: `layers` blocks of `dim` coordinates."""

    def extract(x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.reshape(len(x), layers, dim).unbind(1))

    return extract


def canary_scores(trials: int, *, epsilon: float, delta: float, release_epsilon: float | None = None,
                  layers: int = 2, dim: int = 16, images: int = 100, secagg: int = 0,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The attack's scores of `trials` releases without the canary and `trials` with it.

    `release_epsilon` (default: epsilon) is what the release is calibrated for: a value above
    `epsilon` makes a mechanism that adds too little noise for its claim (the audit's negative
    control)."""
    if not 1 <= trials <= MAX_TRIALS:
        raise PrismError(f"the audit's trials must be in 1..{MAX_TRIALS:,}, got {trials}")
    if layers < 1 or dim < 1 or images < 1 or secagg < 0:
        raise PrismError("the audit needs at least one layer, coordinate and image, and secagg >= 0")
    gen = torch.Generator().manual_seed(seed)
    extract, clip = _features(layers, dim), [1.0] * layers
    k = max(secagg, 1)
    data = [0.5 * torch.randn(images, layers * dim, generator=gen, dtype=torch.float64) for _ in range(k)]
    canary = torch.zeros(1, layers, dim, dtype=torch.float64)
    canary[0, :, 0] = 2.0  # beyond the clip bound, on one axis: clipped to e_0, its square e_0 too
    canary = canary.reshape(1, -1)
    with_canary = [torch.cat([data[0], canary]), *data[1:]]
    share = 1 / math.sqrt(k) if secagg else 1.0
    eps = epsilon if release_epsilon is None else release_epsilon

    def release(parts: list[torch.Tensor], e: float, noise_seed: int | None) -> torch.Tensor:
        total = None
        for i, part in enumerate(parts):
            g = None if noise_seed is None else torch.Generator().manual_seed(noise_seed * k + i)
            out = private_feature_stats(extract, part, clip, e, delta, generator=g, noise_share=share)
            vector = flatten(out.shared)[0]  # the release in clip units (clip = 1), as secure aggregation sends it
            total = vector if total is None else total + vector
        return total

    exact = release(data, math.inf, None)  # what the attacker knows: D's statistics without noise
    direction = release(with_canary, math.inf, None) - exact  # the canary's contribution, norm = sensitivity
    direction = direction / direction.norm()
    base = int(torch.randint(0, 2**40, (1,), generator=gen))
    out = [float((release(data, eps, base + 2 * t) - exact) @ direction) for t in range(trials)]
    inn = [float((release(with_canary, eps, base + 2 * t + 1) - exact) @ direction) for t in range(trials)]
    return np.array(out), np.array(inn)


def epsilon_lower_bound(out: np.ndarray, inn: np.ndarray, delta: float, confidence: float = 0.95,
                        claimed: float = math.nan) -> Audit:  # fmt: skip
    """The epsilon lower bound of scores without (`out`) and with (`inn`) the canary: a threshold
    chosen on the first half of each, Clopper-Pearson bounds on the second half (module docstring)."""
    from scipy.stats import beta

    if len(out) < 4 or len(inn) < 4:
        raise PrismError("the audit needs at least 4 trials on each side")
    alpha = (1 - confidence) / 2  # one-sided, for each of the two rates
    h_out, h_in = len(out) // 2, len(inn) // 2

    def bound(o: np.ndarray, i: np.ndarray, t: float) -> tuple[float, float, float]:
        """(epsilon bound, FPR upper, TPR lower) of the threshold t on scores o (without) and i (with)."""
        fp, tp = int((o >= t).sum()), int((i >= t).sum())
        fpr_up = float(beta.ppf(1 - alpha, fp + 1, len(o) - fp)) if fp < len(o) else 1.0
        tpr_low = float(beta.ppf(alpha, tp, len(i) - tp + 1)) if tp > 0 else 0.0
        return (math.log((tpr_low - delta) / fpr_up) if tpr_low > delta else 0.0), fpr_up, tpr_low

    # the threshold whose bound is best on the first half (quantiles of its scores), then its bound on the second
    first = np.concatenate([out[:h_out], inn[:h_in]])
    candidates = np.unique(np.quantile(first, np.linspace(0.5, 1.0, 101)))
    best_t = max(candidates, key=lambda t: bound(out[:h_out], inn[:h_in], t)[0])
    eps, fpr_up, tpr_low = bound(out[h_out:], inn[h_in:], float(best_t))
    return Audit(claimed, delta, max(eps, 0.0), confidence, min(len(out), len(inn)), float(best_t), fpr_up, tpr_low)


def audit(trials: int, *, epsilon: float, delta: float, secagg: int = 0, seed: int = 0, layers: int = 2,
          release_epsilon: float | None = None, confidence: float = 0.95) -> Audit:  # fmt: skip
    """Run the canary attack on the real release and return its epsilon lower bound."""
    out, inn = canary_scores(trials, epsilon=epsilon, delta=delta, secagg=secagg, seed=seed, layers=layers,
                             release_epsilon=release_epsilon)  # fmt: skip
    return epsilon_lower_bound(out, inn, delta, confidence, claimed=epsilon)
