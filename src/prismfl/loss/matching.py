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


@dataclass
class FeatureStats:
    """Per-layer mean and variance of features over a set of images (what a client 'knows')."""

    mean: list[torch.Tensor]
    var: list[torch.Tensor]
    count: int

    def targets(self) -> list[torch.Tensor]:
        return [*self.mean, *self.var]


@torch.no_grad()
def feature_stats(extract, images: torch.Tensor, batch: int = 500) -> FeatureStats:
    """Exact mean and (biased) variance per feature over all images (accumulated in float64)."""
    if len(images) == 0:
        raise ValueError("feature_stats needs at least one image")
    sums: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    for start in range(0, len(images), batch):
        feats = [f.double() for f in extract(images[start : start + batch])]
        if not sums:
            sums = [torch.zeros_like(f[0]) for f in feats]
            squares = [torch.zeros_like(f[0]) for f in feats]
        for s, q, f in zip(sums, squares, feats):
            s += f.sum(0)
            q += (f * f).sum(0)
    n = len(images)
    mean = [s / n for s in sums]
    var = [(q / n - m * m).clamp_min(0) for q, m in zip(squares, mean)]
    return FeatureStats([m.float() for m in mean], [v.float() for v in var], n)


@dataclass
class TrackerState:
    """GFMN moving-average trackers of the gaps, with their Adam state; persist per client."""

    vectors: list[torch.Tensor] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None

    def state_dict(self) -> dict:
        opt = self.optimizer.state_dict() if self.optimizer is not None else None
        return {"vectors": [v.detach().clone() for v in self.vectors], "optimizer": opt}

    @classmethod
    def from_state_dict(cls, state: dict, lr: float, betas) -> TrackerState:
        tracker = cls([v.clone().requires_grad_(True) for v in state["vectors"]])
        if tracker.vectors:
            tracker.optimizer = torch.optim.Adam(tracker.vectors, lr=lr, betas=betas)
            if state["optimizer"] is not None:
                tracker.optimizer.load_state_dict(state["optimizer"])
        return tracker


def layer_weights(real: FeatureStats, normalize: str) -> list[torch.Tensor]:
    """Weight of each matched statistic, so that no layer drowns the others.

    'none': GFMN's raw squared error. 'layer': each layer's error relative to the size of its
    real statistics (sum of variances for the mean gap, of squared variances for the variance
    gap), so every layer weighs about the same. 'dim': each feature standardised by its own
    real variance.
    """
    if normalize == "none":
        return [torch.ones(()) for _ in real.targets()]
    if normalize == "layer":
        return [1.0 / v.sum().clamp_min(1e-12) for v in real.var] + [
            1.0 / v.pow(2).sum().clamp_min(1e-12) for v in real.var
        ]
    if normalize == "dim":
        floors = [v + 1e-3 * v.mean().clamp_min(1e-12) for v in real.var]
        return [1.0 / f for f in floors] + [1.0 / f.pow(2) for f in floors]
    raise ValueError(f"unknown normalization {normalize!r}; expected one of {NORMALIZATIONS}")


class MeanVarMatching:
    """L = 1/2 sum_l w_l ||mu_l - mu~_l||^2 + w'_l ||var_l - var~_l||^2 over all feature layers."""

    def __init__(
        self, real: FeatureStats, normalize: str = "layer", tracker_lr: float = 0.0, tracker_betas=(0.5, 0.999)
    ):
        self.targets = real.targets()
        self.weights = layer_weights(real, normalize)
        self.tracker_lr = tracker_lr
        self.tracker_betas = tracker_betas

    def to(self, device) -> MeanVarMatching:
        self.targets = [t.to(device) for t in self.targets]
        self.weights = [w.to(device) for w in self.weights]
        return self

    def __call__(self, fake: list[torch.Tensor], tracker: TrackerState | None = None) -> tuple[torch.Tensor, float]:
        fake_stats = [f.mean(0) for f in fake] + [f.var(0, unbiased=False) for f in fake]
        gaps = [r - f.detach() for r, f in zip(self.targets, fake_stats)]
        value = 0.5 * sum(float((w * g * g).sum()) for w, g in zip(self.weights, gaps))
        directions = gaps if tracker is None or self.tracker_lr <= 0 else self._track(gaps, tracker)
        # the gradient of -(w * dir . fake) is w * (fake - real) when dir is the exact gap
        surrogate = -sum((w * d * f).sum() for w, d, f in zip(self.weights, directions, fake_stats))
        return surrogate, value

    def _track(self, gaps: list[torch.Tensor], tracker: TrackerState) -> list[torch.Tensor]:
        if tracker.optimizer is None:
            tracker.vectors = [torch.zeros_like(g).requires_grad_(True) for g in gaps]
            tracker.optimizer = torch.optim.Adam(tracker.vectors, lr=self.tracker_lr, betas=self.tracker_betas)
        for v, g in zip(tracker.vectors, gaps):
            v.grad = v.detach() - g  # gradient of 1/2 ||v - gap||^2
        tracker.optimizer.step()
        return [v.detach() for v in tracker.vectors]
