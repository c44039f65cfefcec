"""Feature matching losses. The only use of a client's private images is its feature statistics.

`MeanVarMatching` is GFMN's loss (METHOD.md §3): match the per-dimension mean and variance of the
generated batch's features to the client's real ones. Optional trackers (GFMN's "moving average"
networks) let the generator follow Adam-smoothed estimates of the gaps instead of one batch's.

A loss is built from the client's `FeatureStats` and called on the generated batch's features;
it returns a surrogate to backpropagate and the loss value to log. Another MMD kernel fits the
same shape: anything with `__call__(fake_features, tracker) -> (surrogate, value)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NORMALIZATIONS = ("none", "layer", "dim")
MOMENTS = ("second", "variance")


@dataclass
class FeatureStats:
    """Per-layer mean and variance of features over a set of images (what a client 'knows')."""

    mean: list[torch.Tensor]
    var: list[torch.Tensor]
    count: int

    @property
    def second(self) -> list[torch.Tensor]:
        """Raw second moments E[f^2] = var + mean^2."""
        return [v + m * m for m, v in zip(self.mean, self.var)]

    def targets(self, moment: str = "variance") -> list[torch.Tensor]:
        return [*self.mean, *(self.second if moment == "second" else self.var)]


@torch.no_grad()
def feature_sums(extract, images: torch.Tensor, batch: int = 500, transform=None):
    """Per-layer sums of features and of their squares over all images, in float64.

    `transform` maps a batch's list of (B, D_l) feature tensors before summing (privacy clips here).
    """
    if len(images) == 0:
        raise ValueError("feature statistics need at least one image")
    sums: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    for start in range(0, len(images), batch):
        feats = [f.double() for f in extract(images[start : start + batch])]
        if transform is not None:
            feats = transform(feats)
        if not sums:
            sums = [torch.zeros_like(f[0]) for f in feats]
            squares = [torch.zeros_like(f[0]) for f in feats]
        for s, q, f in zip(sums, squares, feats):
            s += f.sum(0)
            q += (f * f).sum(0)
    return sums, squares


def stats_from_sums(sums, squares, n) -> FeatureStats:
    """Means and (biased) variances from sums over n images; n may be a noisy float."""
    mean = [s / n for s in sums]
    var = [(q / n - m * m).clamp_min(0) for q, m in zip(squares, mean)]
    return FeatureStats([m.float() for m in mean], [v.float() for v in var], int(round(float(n))))


def feature_stats(extract, images: torch.Tensor, batch: int = 500) -> FeatureStats:
    """Exact mean and (biased) variance per feature over all images."""
    return stats_from_sums(*feature_sums(extract, images, batch), len(images))


TRACKERS = ("none", "ema", "adam")


@dataclass
class TrackerState:
    """Trackers of the per-statistic gaps (GFMN's "moving averages"); persist per client across rounds.

    'ema': v <- beta v + (1 - beta) gap, started at the first gap. 'adam': GFMN's form, v fitted to
    the gap by Adam on 1/2 ||v - gap||^2 (the optimizer is built lazily and kept here).
    """

    vectors: list[torch.Tensor] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None

    def state_dict(self) -> dict:
        opt = self.optimizer.state_dict() if self.optimizer is not None else None
        return {"vectors": [v.detach().clone() for v in self.vectors], "optimizer": opt}

    @classmethod
    def from_state_dict(cls, state: dict, lr: float = 1e-5, betas=(0.5, 0.999)) -> TrackerState:
        tracker = cls([v.clone() for v in state["vectors"]])
        if state["optimizer"] is not None:
            tracker.vectors = [v.requires_grad_(True) for v in tracker.vectors]
            tracker.optimizer = torch.optim.Adam(tracker.vectors, lr=lr, betas=betas)
            tracker.optimizer.load_state_dict(state["optimizer"])
        return tracker


def layer_weights(real: FeatureStats, normalize: str, moment: str = "variance") -> list[torch.Tensor]:
    """Weight of each matched statistic, so that no layer drowns the others.

    'none': GFMN's raw squared error. 'layer': each layer's error relative to the size of its
    real statistics (sum of variances for the mean gap, of squared variances for the variance
    gap), so every layer weighs about the same. 'dim': each feature standardised by its own
    real variance.
    """
    if normalize == "none":
        return [torch.ones(()) for _ in real.targets()]
    if normalize == "layer":
        seconds = real.second if moment == "second" else real.var
        return [1.0 / v.sum().clamp_min(1e-12) for v in real.var] + [
            1.0 / s.pow(2).sum().clamp_min(1e-12) for s in seconds
        ]
    if normalize == "dim":
        floors = [v + 1e-3 * v.mean().clamp_min(1e-12) for v in real.var]
        return [1.0 / f for f in floors] + [1.0 / f.pow(2) for f in floors]
    raise ValueError(f"unknown normalization {normalize!r}; expected one of {NORMALIZATIONS}")


class MeanVarMatching:
    """L = 1/2 sum_l w_l ||mu_l - mu~_l||^2 + w'_l ||var_l - var~_l||^2 over all feature layers."""

    def __init__(
        self,
        real: FeatureStats,
        normalize: str = "layer",
        moment: str = "variance",
        *,
        tracker: str = "none",
        tracker_beta: float = 0.9,
        tracker_lr: float = 1e-5,
        tracker_betas=(0.5, 0.999),
    ):
        if moment not in MOMENTS:
            raise ValueError(f"unknown moment {moment!r}; expected one of {MOMENTS}")
        if tracker not in TRACKERS:
            raise ValueError(f"unknown tracker {tracker!r}; expected one of {TRACKERS}")
        self.moment = moment
        self.tracker = tracker
        self.tracker_beta = tracker_beta
        self.targets = real.targets(moment)
        self.weights = layer_weights(real, normalize, moment)
        self.tracker_lr = tracker_lr
        self.tracker_betas = tracker_betas

    def to(self, device) -> MeanVarMatching:
        self.targets = [t.to(device) for t in self.targets]
        self.weights = [w.to(device) for w in self.weights]
        return self

    def __call__(self, fake: list[torch.Tensor], tracker: TrackerState | None = None) -> tuple[torch.Tensor, float]:
        fake_mean = [f.mean(0) for f in fake]
        fake_second = [(f * f).mean(0) for f in fake]
        if self.moment == "variance":  # E[x^2] - E[x]^2: one pass, several times faster than torch.var
            fake_second = [s - m * m for s, m in zip(fake_second, fake_mean)]
        fake_stats = fake_mean + fake_second
        gaps = [r - f.detach() for r, f in zip(self.targets, fake_stats)]
        value = 0.5 * sum(float((w * g * g).sum()) for w, g in zip(self.weights, gaps))
        directions = gaps if tracker is None or self.tracker == "none" else self._track(gaps, tracker)
        # the gradient of -(w * dir . fake) is w * (fake - real) when dir is the exact gap
        surrogate = -sum((w * d * f).sum() for w, d, f in zip(self.weights, directions, fake_stats))
        return surrogate, value

    def _track(self, gaps: list[torch.Tensor], tracker: TrackerState) -> list[torch.Tensor]:
        if self.tracker == "ema":
            if not tracker.vectors:
                tracker.vectors = [g.clone() for g in gaps]
            else:
                for v, g in zip(tracker.vectors, gaps):
                    v.mul_(self.tracker_beta).add_(g, alpha=1.0 - self.tracker_beta)
            return tracker.vectors
        if tracker.optimizer is None:
            tracker.vectors = [torch.zeros_like(g).requires_grad_(True) for g in gaps]
            tracker.optimizer = torch.optim.Adam(tracker.vectors, lr=self.tracker_lr, betas=self.tracker_betas)
        for v, g in zip(tracker.vectors, gaps):
            v.grad = v.detach() - g  # gradient of 1/2 ||v - gap||^2
        tracker.optimizer.step()
        return [v.detach() for v in tracker.vectors]
