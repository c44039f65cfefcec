"""Feature matching losses. The only use of a client's private images is its feature statistics.

`MeanVarMatching` is GFMN's loss (METHOD.md §3): match the per-dimension mean and variance of the
generated batch's features to the client's real ones. Optional trackers (GFMN's "moving average"
networks, loss/trackers.py) let the generator follow smoothed estimates of the gaps instead of one batch's.

A loss is built from the client's `FeatureStats` and called on the generated batch's features;
it returns a surrogate to backpropagate and the loss value to log. Another MMD kernel fits the
same shape: anything with `__call__(fake_features, tracker) -> (surrogate, value)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prismfl import schema
from prismfl.loss.trackers import TRACKERS, TrackerState

MOMENTS = ("variance", "mean")  # "mean": match the means only (DP-MERF's choice at small epsilon)


@dataclass
class FeatureStats:
    """Per-layer mean and variance of features over a set of images (what a client 'knows').

    Per class (model.conditional): every tensor is (classes, D) and `class_counts` holds the (possibly
    noisy) number of images of each class; a class with count 0 has zero statistics and is not matched.
    """

    mean: list[torch.Tensor]
    var: list[torch.Tensor]
    count: int
    class_counts: torch.Tensor | None = None  # float64 (classes,), per-class statistics only

    def of_class(self, c: int) -> FeatureStats:
        return FeatureStats([m[c] for m in self.mean], [v[c] for v in self.var],
                            int(round(float(self.class_counts[c]))))  # fmt: skip

    def to_tree(self) -> dict:
        """A safestate tree (ClientRuntime's state, the pooled statistics on Flower's wire)."""
        tree = {"mean": self.mean, "var": self.var, "count": self.count}
        if self.class_counts is not None:
            tree["class_counts"] = self.class_counts
        return tree

    @staticmethod
    def schema(features: list[tuple[int, ...]] | None = None, codes: int | None = None) -> schema.Node:
        """What to_tree writes: per feature layer a mean and a variance (>= 0), finite float32 of the layer's
        shape in `features` ((codes, D) per class when `codes` > 0, with the float64 class counts: finite,
        noisy ones may be negative), and the image count (an int >= 0). None: not known here."""
        if features is None:
            layer = schema.Tensor(torch.float32, None)
            means = schema.List(layer, min_len=1, what="a list of float32 tensors, one per feature layer")
            vars_ = schema.List(schema.Tensor(torch.float32, None, lo=0.0), min_len=1,
                                what="a list of float32 tensors >= 0, one per feature layer")  # fmt: skip
        else:
            rows = (codes,) if codes else ()
            n = len(features)
            means = schema.Items([schema.Tensor(torch.float32, (*rows, *f)) for f in features],
                                 what=f"a list of {n} float32 tensors, one per feature layer")  # fmt: skip
            vars_ = schema.Items([schema.Tensor(torch.float32, (*rows, *f), lo=0.0) for f in features],
                                 what=f"a list of {n} float32 tensors >= 0, one per feature layer")  # fmt: skip
        fields = {"mean": means, "var": vars_, "count": schema.Int(0, 2**53, what="an image count (an int >= 0)")}
        counts = schema.Tensor(torch.float64, (None,) if codes is None else (codes,))
        if codes:
            return schema.Table({**fields, "class_counts": counts}, what="feature statistics (a table)")
        optional = {"class_counts": counts if codes is None else schema.Never("no class counts (unconditional)")}
        return schema.Table(fields, optional=optional, what="feature statistics (a table)")

    @classmethod
    def from_tree(cls, tree: dict, features: list[tuple[int, ...]] | None = None, codes: int | None = None, *,
                  where: str = "feature statistics", path: str = "",
                  checked: bool = False) -> FeatureStats:  # fmt: skip
        """The inverse of to_tree. A StateError naming the field where the tree does not fit `schema`
        (for these feature layers and classes, where known; `checked`: the caller has checked it); a
        ValueError where its parts do not fit one another."""
        if not checked:
            schema.check(FeatureStats.schema(features, codes), tree, where, path)
        mean, var, counts = list(tree["mean"]), list(tree["var"]), tree.get("class_counts")
        rows = 1 if counts is None else len(counts)
        dim = 1 if counts is None else 2
        fit = all(m.shape == v.shape and m.dim() == dim and (dim == 1 or m.shape[0] == rows) for m, v in zip(mean, var))
        if len(mean) != len(var) or not fit:
            raise ValueError("feature statistics of inconsistent shapes")
        return cls(mean, var, tree["count"], counts)

    @property
    def second(self) -> list[torch.Tensor]:
        """Raw second moments E[f^2] = var + mean^2."""
        return [v + m * m for m, v in zip(self.mean, self.var)]

    def targets(self, moment: str = "variance") -> list[torch.Tensor]:
        if moment == "mean":
            return [*self.mean]
        return [*self.mean, *self.var]


@torch.no_grad()
def feature_sums(extract, images: torch.Tensor, batch: int = 500, transform=None,
                 labels: torch.Tensor | None = None, num_classes: int = 0):  # fmt: skip
    """Per-layer sums of features and of their squares over all images, in float64.

    `transform` maps a batch's list of (B, D_l) feature tensors before summing (privacy clips here).
    With `labels`, every image adds to its own class's row only: the sums are (num_classes, D_l).
    """
    if len(images) == 0:
        raise ValueError("feature statistics need at least one image")
    if labels is not None and (labels.shape != (len(images),) or int(labels.min()) < 0
                               or int(labels.max()) >= num_classes):  # fmt: skip
        raise ValueError(f"per-class statistics need one label in 0..{num_classes - 1} per image")
    sums: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    for start in range(0, len(images), batch):
        feats = [f.double() for f in extract(images[start : start + batch])]
        if transform is not None:
            feats = transform(feats)
        if not sums:
            shape = lambda f: f.shape[1:] if labels is None else (num_classes, *f.shape[1:])  # noqa: E731
            sums = [f.new_zeros(shape(f)) for f in feats]
            squares = [f.new_zeros(shape(f)) for f in feats]
        if labels is None:
            for s, q, f in zip(sums, squares, feats):
                s += f.sum(0)
                q += (f * f).sum(0)
            continue
        index = labels[start : start + batch].long().to(feats[0].device)
        for s, q, f in zip(sums, squares, feats):
            s.index_add_(0, index, f)
            q.index_add_(0, index, f * f)
    return sums, squares


def stats_from_sums(sums, squares, n) -> FeatureStats:
    """Means and (biased) variances from sums over n images; n may be a noisy float. Per class: sums
    are (classes, D) and n is a (classes,) tensor of counts (a class with n < 1 gets zero statistics)."""
    if isinstance(n, torch.Tensor) and n.dim() == 1:
        counts = n.double()
        on = counts.to(sums[0].device)  # the sums may live on a GPU; the counts stay where they were given
        div, held = on.clamp_min(1.0)[:, None], (on >= 1)[:, None]
        mean = [s / div * held for s in sums]
        var = [(q / div - m * m).clamp_min(0) * held for q, m in zip(squares, mean)]
        total = int(round(float(counts.clamp_min(0).sum())))
        # the counts as released (noisy ones may be negative): summed over clients they stay unbiased
        return FeatureStats([m.float() for m in mean], [v.float() for v in var], total, counts.clone())
    mean = [s / n for s in sums]
    var = [(q / n - m * m).clamp_min(0) for q, m in zip(squares, mean)]
    return FeatureStats([m.float() for m in mean], [v.float() for v in var], int(round(float(n))))


def combine_stats(parts: list[FeatureStats]) -> FeatureStats:
    """The statistics of the union of the parts' images (the federation's pooled statistics): each part's
    means and raw second moments weighed by its image count (per class: by its class counts)."""
    if not parts or len({p.class_counts is None for p in parts}) != 1:
        raise ValueError("combine_stats needs statistics, all per class or all not")
    per_class = parts[0].class_counts is not None
    weights = [p.class_counts.double()[:, None] if per_class else float(p.count) for p in parts]
    sums = [sum(w * p.mean[i].double() for w, p in zip(weights, parts)) for i in range(len(parts[0].mean))]
    squares = [sum(w * q.double() for w, q in zip(weights, (p.second[i] for p in parts))) for i in range(len(sums))]
    n = sum(p.class_counts.double() for p in parts) if per_class else float(sum(p.count for p in parts))
    return stats_from_sums(sums, squares, n)


def feature_stats(extract, images: torch.Tensor, batch: int = 500, labels: torch.Tensor | None = None,
                  num_classes: int = 0) -> FeatureStats:  # fmt: skip
    """Exact mean and (biased) variance per feature over all images (per class, with `labels`)."""
    sums, squares = feature_sums(extract, images, batch, labels=labels, num_classes=num_classes)
    if labels is None:
        return stats_from_sums(sums, squares, len(images))
    return stats_from_sums(sums, squares, torch.bincount(labels.long(), minlength=num_classes).double())


def layer_weights(
    real: FeatureStats, moment: str = "variance", scales: list[float] | None = None
) -> list[torch.Tensor]:
    """Weight of each matched statistic, so that no layer drowns the others: each layer's error relative
    to the size of its real statistics (sum of variances for the mean gap, of squared variances for the
    variance gap), so every layer weighs about the same; or, given `scales` (a typical feature norm per
    layer from public data: the clip bounds of a private release), relative to scale^2 and scale^4.
    Moment "mean": the mean gaps' only.
    """
    if moment == "mean":
        return layer_weights(real, "variance", scales)[: len(real.mean)]
    if scales is not None:
        return [torch.tensor(1.0 / s**2) for s in scales] + [torch.tensor(1.0 / s**4) for s in scales]
    return [1.0 / v.sum().clamp_min(1e-12) for v in real.var] + [
        1.0 / v.pow(2).sum().clamp_min(1e-12) for v in real.var
    ]


def moments(fake: list[torch.Tensor], moment: str, unbiased: bool = False) -> list[torch.Tensor]:
    """Per-layer batch means, then variances (unbiased: times b / (b - 1)); "mean": the means only."""
    mean = [f.mean(0) for f in fake]
    if moment == "mean":
        return mean
    second = [(f * f).mean(0) for f in fake]
    # E[x^2] - E[x]^2: one pass, several times faster than torch.var
    b = fake[0].shape[0]
    scale = b / (b - 1) if unbiased else 1.0
    return mean + [(s - m * m) * scale for s, m in zip(second, mean)]


class MeanVarMatching:
    """L = 1/2 sum_l w_l ||mu_l - mu~_l||^2 + w'_l ||var_l - var~_l||^2 over all feature layers."""

    def __init__(
        self,
        real: FeatureStats,
        moment: str = "variance",
        *,
        tracker: str = "none",
        tracker_beta: float = 0.9,
        tracker_lr: float = 1e-5,
        tracker_betas=(0.5, 0.999),
        scales: list[float] | None = None,
    ):
        if moment not in MOMENTS:
            raise ValueError(f"unknown moment {moment!r}; expected one of {MOMENTS}")
        if tracker not in TRACKERS:
            raise ValueError(f"unknown tracker {tracker!r}; expected one of {TRACKERS}")
        self.moment = moment
        self.tracker = tracker
        self.tracker_beta = tracker_beta
        self.targets = real.targets(moment)
        self.weights = layer_weights(real, moment, scales)
        self.tracker_lr = tracker_lr
        self.tracker_betas = tracker_betas

    def to(self, device) -> MeanVarMatching:
        self.targets = [t.to(device) for t in self.targets]
        self.weights = [w.to(device) for w in self.weights]
        return self

    redraws = False  # whether every step's batch needs its classes drawn afresh (labels with a generator)

    def labels(self, batch: int, device="cpu", generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The classes of a generated batch: None, the loss is unconditional."""
        return None

    def fake_stats(self, fake: list[torch.Tensor], labels: torch.Tensor | None) -> list[torch.Tensor]:
        if labels is not None:
            raise ValueError("an unconditional matching loss takes no labels")
        return moments(fake, self.moment)

    def __call__(self, fake: list[torch.Tensor], tracker: TrackerState | None = None,
                 labels: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:  # fmt: skip
        return self._match(self.fake_stats(fake, labels), self.targets, self.weights, self._tracking(tracker))

    def _tracking(self, tracker: TrackerState | None):
        """gaps -> the directions to follow: the gaps themselves, or the trackers moved by them."""
        if tracker is None or self.tracker == "none":
            return None
        return lambda gaps: tracker.follow(gaps, self.tracker, self.tracker_beta, self.tracker_lr, self.tracker_betas)

    def _match(self, fake_stats, targets, weights, track) -> tuple[torch.Tensor, float]:
        gaps = [r - f.detach() for r, f in zip(targets, fake_stats)]
        value = 0.5 * sum(float((w * g * g).sum()) for w, g in zip(weights, gaps))
        directions = gaps if track is None else track(gaps)
        # the gradient of -(w * dir . fake) is w * (fake - real) when dir is the exact gap
        surrogate = -sum((w * d * f).sum() for w, d, f in zip(weights, directions, fake_stats))
        return surrogate, value


def pooled_stats(real: FeatureStats, shares: dict[int, float]) -> FeatureStats:
    """The statistics of the mixture of classes with these shares, from the per-class ones: mean
    sum_c s_c mu_c, variance sum_c s_c (var_c + mu_c^2) - mean^2."""
    mean = [sum(s * m[c].double() for c, s in shares.items()) for m in real.mean]
    second = [sum(s * (v[c].double() + m[c].double() ** 2) for c, s in shares.items())
              for m, v in zip(real.mean, real.var)]  # fmt: skip
    var = [(q - m * m).clamp_min(0).float() for q, m in zip(second, mean)]
    return FeatureStats([m.float() for m in mean], var, real.count)


class ConditionalMatching(MeanVarMatching):
    """Per-class matching (model.conditional): L = sum_c share_c L_c, where L_c is MeanVarMatching's
    loss between the generated images of class c and the client's statistics of class c, over the
    classes the client holds (count >= `min_count`; with privacy, noisy counts below the noise are
    treated as absent). A generated batch holds every such class in equal numbers (`labels`), and the
    variances of its small class groups are unbiased (b / (b - 1)).

    The statistics of all classes are stacked: every target is a (classes, D) tensor and its weight a
    (classes, 1) column, so a step costs a few tensor operations per layer, not per class and layer.

    `codes_per_step` = m > 0 (loss.codes_per_step): each step's batch holds m of the k classes (or modes)
    drawn uniformly at random without replacement, and their terms are weighed by k / m, the inverse of a
    class's chance to be drawn: the expected gradient is the full loss's, at the cost of a batch for m
    classes instead of k. Each class's tracker then moves only on the steps that draw it, and starts at
    its first gap."""

    def __init__(self, real: FeatureStats, moment: str = "variance", *,
                 min_count: float = 1.0, codes_per_step: int = 0, **options):  # fmt: skip
        if real.class_counts is None:
            raise ValueError("per-class matching needs per-class statistics")
        counts = real.class_counts.double()
        self.classes = [c for c in range(len(counts)) if float(counts[c]) >= min_count]
        if not self.classes:
            raise ValueError(f"no class has at least {min_count:g} images: nothing to match")
        super().__init__(real.of_class(self.classes[0]), moment, **options)
        total = float(counts[self.classes].sum())
        self.shares = {c: float(counts[c]) / total for c in self.classes}
        # every class's statistics are weighed by the scale of the layer over all the client's images
        # (a class's own variances can be tiny, e.g. of the class probabilities, and would blow up)
        scale = layer_weights(pooled_stats(real, self.shares), moment, options.get("scales"))
        held = self._held = torch.tensor(self.classes)
        self._position = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t[held].clone() for t in real.targets(moment)]  # (classes, D) per statistic
        shares = torch.tensor([self.shares[c] for c in self.classes])[:, None]
        self.weights = [w * shares.to(w.device) for w in scale]  # (classes, 1) per statistic
        if codes_per_step < 0:
            raise ValueError(f"codes_per_step must be >= 0 (0: every class at every step), got {codes_per_step}")
        self.per_step = min(codes_per_step, len(self.classes)) if codes_per_step else len(self.classes)
        self.redraws = self.per_step < len(self.classes)

    def labels(self, batch: int, device="cpu", generator: torch.Generator | None = None) -> torch.Tensor:
        """The classes of a generated batch: every held class (or `per_step` of them drawn with
        `generator`), each repeated in turn."""
        k, m = len(self.classes), self.per_step
        if batch < 2 * m:
            what = f"each of this client's {k} classes" if m == k else f"each of {m} classes a step"
            raise ValueError(f"a batch of {batch} cannot hold two images of {what}; "
                             f"raise train.batch_size to at least {2 * m}")  # fmt: skip
        classes = self._held
        if m < k:
            if generator is None:
                raise ValueError("drawing a subset of the classes at every step needs a random generator")
            classes = classes[torch.randperm(k, generator=generator, device=generator.device)[:m].sort().values.cpu()]
        return classes.to(device)[torch.arange(batch, device=device) % m]

    def _drawn(self, labels: torch.Tensor) -> torch.Tensor:
        """Positions in self.classes of the classes present in `labels`, in order."""
        present = torch.unique(labels).tolist()
        if any(c not in self._position for c in present):
            raise ValueError("the batch holds a class this loss does not match")
        return torch.tensor([self._position[c] for c in present], dtype=torch.long)

    def fake_stats(self, fake: list[torch.Tensor], labels: torch.Tensor | None,
                   rows: torch.Tensor | None = None) -> list[torch.Tensor]:  # fmt: skip
        """The generated batch's statistics, stacked (classes, D) as self.targets: of every held class, or
        with a subset per step of the drawn ones (`rows`: their positions, when already known)."""
        if labels is None or labels.shape != (fake[0].shape[0],):
            raise ValueError("per-class matching needs the class of every generated image")
        if rows is None and self.redraws:
            rows = self._drawn(labels)
        drawn = (self._held if rows is None else self._held[rows.cpu()]).to(labels.device)
        # per-class sums as one product with the (classes x batch) indicator: one pass over each layer,
        # and one gradient buffer in the backward pass (a gather per class would make one per class)
        member = (labels[None, :] == drawn[:, None]).to(fake[0].dtype)
        n = member.sum(1, keepdim=True)
        if float(n.min()) < 2:
            raise ValueError("every class needs at least two generated images in the batch")
        means = [member @ f / n for f in fake]
        if self.moment == "mean":
            return means
        seconds = [member @ (f * f) / n for f in fake]
        # variances, unbiased within each class's small group
        return means + [(s - m * m) * (n / (n - 1)) for s, m in zip(seconds, means)]

    def __call__(self, fake: list[torch.Tensor], tracker: TrackerState | None = None,
                 labels: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:  # fmt: skip
        shapes = [t.shape for t in self.targets]
        if tracker is not None and tracker.vectors and [v.shape for v in tracker.vectors] != shapes:
            # trackers of another layout (a checkpoint from before the statistics were stacked): start afresh
            tracker.vectors, tracker.optimizer, tracker.started = [], None, None
        if not self.redraws:
            return self._match(self.fake_stats(fake, labels), self.targets, self.weights, self._tracking(tracker))
        # a subset of the classes: their rows only, weighed by k / m, and their trackers only
        if labels is None:
            raise ValueError("per-class matching needs the class of every generated image")
        rows = self._drawn(labels).to(self.targets[0].device)
        fake_stats = self.fake_stats(fake, labels, rows)
        up = len(self.classes) / len(rows)
        targets, weights = [t[rows] for t in self.targets], [w[rows] * up for w in self.weights]
        track = self._tracking(tracker)
        if track is not None:
            if self.tracker != "ema":
                raise ValueError("a subset of the classes at every step needs the 'ema' tracker or none")
            track = lambda gaps: tracker.follow_rows(gaps, rows, self.tracker_beta, self.targets)  # noqa: E731
        return self._match(fake_stats, targets, weights, track)
