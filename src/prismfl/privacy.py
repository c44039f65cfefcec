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

import numpy as np
import torch

from prismfl.accounting import budget, noise_multiplier, spent_epsilon
from prismfl.data.federation import Federation
from prismfl.errors import ConfigError
from prismfl.loss.matching import FeatureStats, feature_sums, stats_from_sums
from prismfl.model import masked
from prismfl.model.build import build_model, initial_scores
from prismfl.seeds import generator_for


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
    shared: dict | None = None  # the noisy sums in feature units, what pooling sends the server (pool_releases)

    def summary(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sensitivity": self.sensitivity, "noise_std": self.noise_multiplier * self.sensitivity,
                "clip": self.clip}  # fmt: skip


def summary_schema(cfg, layers: int | None = None):
    """What a client keeps of its release (`PrivateRelease.summary`, with `Private.release`'s secure
    aggregation fields) in a run of `cfg` whose feature net has `layers` layers: null without privacy;
    the guarantee as budgeted for cfg's (epsilon, delta) (accounting.budget: epsilon is every release's
    composition, noise_multiplier the statistics' own, moments_noise_multiplier the modes' moment sums'),
    the sensitivity of that many layers and a positive clip bound per layer (what the run's records and
    model file state, and what the loss uses)."""
    from prismfl import schema

    p = cfg.privacy
    if math.isinf(p.epsilon):
        return schema.Null()
    positive = schema.Num(0, above=True)
    fields = {"epsilon": positive, "delta": schema.Const(p.delta, what=f"{p.delta:g} (privacy.delta)"),
              "noise_multiplier": positive, "sensitivity": positive, "noise_std": positive,
              "clip": schema.List(positive, layers, what="a positive clip bound per feature layer")}  # fmt: skip
    plan = budget(cfg)
    if "moments" in plan.noise:
        fields["moments_noise_multiplier"] = positive
    if p.secagg:
        fields.update(secagg=schema.Const(True), colluders=schema.Const(p.colluders), client_noise_std=positive)
        if p.dropouts:  # (absent without: a run without dropouts writes what it wrote before they existed)
            from prismfl.secagg import min_survivors

            fields["min_survivors"] = schema.Const(min_survivors(cfg.partition.num_clients, p.dropouts))
    table = schema.Table(fields, what="a private release's parameters (a table)")

    def calibrated(summary: dict, path: str) -> None:
        second = cfg.loss.moment != "mean"
        want = {"noise_multiplier": plan.z("statistics"), "epsilon": plan.epsilon,
                "sensitivity": math.sqrt((2 if second else 1) * len(summary["clip"]) + 1)}  # fmt: skip
        want["noise_std"] = want["noise_multiplier"] * want["sensitivity"]
        if "moments" in plan.noise:
            want["moments_noise_multiplier"] = plan.z("moments")
        if p.secagg:
            from prismfl.secagg import noise_share

            want["client_noise_std"] = want["noise_std"] * noise_share(cfg.partition.num_clients, p.dropouts,
                                                                       p.colluders)  # fmt: skip
        for key, value in want.items():
            if not math.isclose(summary[key], value, rel_tol=1e-6):
                schema.fail(schema.join(path, key), f"{value:.6g} (the release of privacy.epsilon = {p.epsilon:g}, "
                            f"delta = {p.delta:g})", summary[key])  # fmt: skip

    return schema.Each(table, calibrated)


def clip_rows(f: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale each row to L2 norm at most `bound`."""
    norms = f.norm(dim=1, keepdim=True)
    return f * torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)


@torch.no_grad()
def clip_bounds(extract, reference: torch.Tensor, multiplier: float) -> list[float]:
    """C_l = multiplier x median L2 norm of layer l's features on reference images that are not private."""
    feats = extract(reference)
    return [multiplier * float(f.double().norm(dim=1).median()) for f in feats]


def privacy_clip(cfg, fed: Federation, extract, device: str = "cpu") -> list[float]:
    """Per-layer clip bounds of run `cfg` (a RunConfig) from images that are not private: the public
    hold-out when there is one, otherwise samples of the untrained generator (which depend on the seed alone)."""
    if len(fed.public_idx):
        reference = fed.images(fed.public_idx[:1000])
    else:
        model = build_model(cfg)
        masked.configure(model, rng=generator_for(cfg.seed, "clip-reference"))
        masked.set_scores(model, initial_scores(cfg, masked.num_maskable(model)))
        z = torch.randn(1000, model.z_dim, generator=generator_for(cfg.seed, "clip-z"))
        with torch.no_grad():  # a conditional generator: every class in turn
            codes = getattr(model, "codes", 0)
            reference = model(z) if not codes else model(z, torch.arange(1000) % codes)
    return clip_bounds(lambda x: extract(x.to(device)), reference.to(device), cfg.privacy.clip)


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
    noise_share: float = 1.0,
    shrink: bool = False,
    target: dict | None = None,
    noise: float | None = None,
) -> PrivateRelease:
    """Release a client's feature statistics with (epsilon, delta)-DP (module docstring).

    Per class (`labels`): an image adds its vector r(x) to its own class's block of sums only, and
    its 1 to its class's count; every class's block and count is released with the same noise,
    including the classes the client does not hold (which classes it holds is private too). One image
    still moves one block by ||r(x)|| <= sqrt(2L + 1): the sensitivity is unchanged.

    `second = False` (loss.moment = "mean"): r(x) = [u_1/C_1, ..., u_L/C_L, 1], the means only, with
    sensitivity sqrt(L + 1); nothing is released about second moments (the variances are zeros).

    `shrink`: James-Stein shrinkage of the release (shrink_sums), toward `target` when given
    (public_target), else toward each layer's average.

    `noise_share < 1` (distributed noise, secagg.py): the client adds only that fraction of the noise's
    standard deviation; its release is then NOT (epsilon, delta)-DP alone, only the secure sum of all
    clients' releases is. Its `stats` must not be used; `shared` goes to secure aggregation.

    `noise`: the noise multiplier the run's budget gives this release (accounting.budget) where the run
    makes several; by default the one release that meets (epsilon, delta) alone."""
    z = noise_multiplier(epsilon, delta) if noise is None else noise
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
    warn = labels is not None and noise_share == 1  # distributed noise: a client's own share says nothing
    warnings = weak_classes(sums, count, z * sensitivity, class_names) if warn else []
    if z > 0:
        gen = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(63))
        std = z * sensitivity * noise_share

        def noisy(t: torch.Tensor) -> torch.Tensor:
            return t + std * torch.randn(t.shape, generator=gen, dtype=torch.float64)

        sums = [noisy(s) for s in sums]
        if second:
            squares = [noisy(q) for q in squares]
        count = noisy(count)
    if not second:  # not released: zero second moments give zero variances
        squares = [torch.zeros_like(q) for q in squares]
    n = count.clamp_min(1.0) if labels is None else count
    shared = {"sums": [c * s for s, c in zip(sums, clip)], "squares": [c * c * q for q, c in zip(squares, clip)],
              "counts": count.reshape(-1)}  # fmt: skip
    if shrink and z > 0 and noise_share == 1:
        shared = shrink_sums(shared, z * sensitivity, clip, min_count=count_floor(z * sensitivity), target=target)
    stats = stats_from_sums(shared["sums"], shared["squares"], n)
    return PrivateRelease(stats, spent_epsilon(z, delta), delta, z, sensitivity, clip, warnings, shared)


MOMENTS_CLIP = 0.5  # the pooled images' L2 clip bound in the moments' release, times the largest norm (sqrt(d))


def private_moment_sums(images: np.ndarray, labels: np.ndarray, num_classes: int, noise: float, *,
                        scale: float = 1.0, generator: np.random.Generator | None = None) -> dict:  # fmt: skip
    """A client's moment sums for the class modes (data/modes.py moment_sums) as a Gaussian release of
    noise multiplier `noise` (accounting.budget's "moments").

    Each pooled image x (d values in [0, 1]) is clipped to ||x|| <= C = MOMENTS_CLIP sqrt(d); one image
    adds 1 to its class's count, x to its sums and x x^T to its outer products, whose lower triangle (what
    is released; the upper one mirrors it) has Frobenius norm <= ||x||^2 <= C^2. In units of (1, C, C^2)
    the three blocks move by at most 1 each: L2 sensitivity sqrt(3). Every class is released, held or not
    (which classes a client holds is private too), with noise of std noise sqrt(3) in those units, drawn
    from the operating system's entropy unless a `generator` is given (tests)."""
    from prismfl.data.modes import moment_sums, pooled_pixels

    d = pooled_pixels(images[:1], scale).shape[1]
    clip = MOMENTS_CLIP * math.sqrt(d)
    sums = moment_sums(images, labels, num_classes, scale, clip=clip)
    rng = generator if generator is not None else np.random.default_rng(secrets.randbits(128))
    std = noise * math.sqrt(3)
    lower = np.tril(rng.standard_normal(sums["outer"].shape))
    return {"counts": sums["counts"] + std * rng.standard_normal(num_classes),
            "sums": sums["sums"] + std * clip * rng.standard_normal(sums["sums"].shape),
            "outer": sums["outer"] + std * clip**2 * (lower + np.tril(lower, -1).swapaxes(1, 2))}  # fmt: skip


def min_count(privacy: dict | None) -> float:
    """The smallest (noisy) class count a class's statistics are used with: three noise deviations
    under privacy (a count below that is mostly noise), one image otherwise. Post-processing."""
    return count_floor(privacy["noise_std"]) if privacy else 1.0


def count_floor(noise_std: float) -> float:
    return max(1.0, 3 * noise_std)


def check_shared(shared: dict, like: dict | None, num_classes: int) -> None:
    """A client's shared release has the shape of the first one (`like`) and only finite float64 values:
    a StateError otherwise (it came over the network)."""
    from prismfl.safestate import StateError, require

    require(shared, {"sums": list, "squares": list, "counts": torch.Tensor}, "a client's shared statistics")
    tensors = [*shared["sums"], *shared["squares"], shared["counts"]]
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 and bool(torch.isfinite(t).all())
               for t in tensors):  # fmt: skip
        raise StateError("a client's shared statistics are not finite float64 tensors")
    if shared["counts"].shape != (max(num_classes, 1),):
        raise StateError(f"a client's shared statistics hold {tuple(shared['counts'].shape)} counts for "
                         f"{max(num_classes, 1)}")  # fmt: skip
    shapes = [t.shape for t in tensors]
    if like is None:
        if len(shared["sums"]) != len(shared["squares"]) or any(
            a.shape != b.shape or a.dim() != (2 if num_classes else 1) or (num_classes and a.shape[0] != num_classes)
            for a, b in zip(shared["sums"], shared["squares"])
        ):  # fmt: skip
            raise StateError("a client's shared statistics have inconsistent shapes")
    elif shapes != [t.shape for t in [*like["sums"], *like["squares"], like["counts"]]]:
        raise StateError("the clients' shared statistics differ in shape")


def pool_releases(shared: dict[int, dict], *, num_classes: int, min_count: float) -> FeatureStats:
    """The pooled statistics of all clients' releases (post-processing: each release is already DP):
    the sum of their noisy sums over the sum of their noisy counts. Per class, only the clients whose
    noisy count of the class is at least `min_count` contribute (the others' blocks would add noise
    and no signal); a class no client holds gets count 0. The noise on a pooled sum is sqrt(K) times a
    client's, over K times the images."""
    if not shared:
        raise ValueError("no client shared its statistics")
    first = None
    for k in sorted(shared):
        check_shared(shared[k], first, num_classes)
        first = first or shared[k]
    parts = list(shared.values())
    # each client's weight: per class, 1 where its noisy count reaches min_count (a column for the rows)
    use = [(p["counts"] >= min_count).double() if num_classes else torch.ones(1, dtype=torch.float64) for p in parts]
    rows = [u[:, None] if num_classes else u[0] for u in use]
    summed = {key: [sum(w * p[key][i] for w, p in zip(rows, parts)) for i in range(len(first[key]))]
              for key in ("sums", "squares")}  # fmt: skip
    summed["counts"] = sum(u * p["counts"] for u, p in zip(use, parts))
    return stats_of_sum(summed, num_classes)


def shrink_sums(summed: dict, sigma: float, clip: list[float], min_count: float = 1.0,
                target: dict | None = None, kept: dict | None = None) -> dict:  # fmt: skip
    """Positive-part James-Stein shrinkage of noisy sums (privacy.shrink; post-processing). Per class
    row with noisy count n >= min_count and per layer l of D >= 4 coordinates, the mean m = S / n
    carries Gaussian noise of known std tau = sigma C_l / n on every coordinate (sigma: the noise on
    the sums in clip units), the second moment q = Q / n noise sigma C_l^2 / n; each is pulled toward
    a target t by max(0, 1 - k tau^2 / ||x - t||^2), which lowers the expected squared error whatever
    the true values are. The target is the layer's average of x (k = D - 3), or, given `target`
    (privacy.shrink = "public": the same clipped statistics of the public images, public_target;
    fixed before any noise is drawn, k = D - 2). Where the noise dominates (the second moments of
    large feature maps) what is left is the target: the layer's flat average, or the public images'
    own statistics, not noise to imitate. `kept`, when given, receives the factors ("means",
    "seconds": one per class row and layer): how much of the release's departure from the target
    survived."""
    counts = summed["counts"].double().reshape(-1)
    rows = summed["sums"][0].dim() == 2

    def shrink(t: torch.Tensor, scale: float, goal: torch.Tensor | None, factors: list) -> torch.Tensor:
        out = t.clone()
        for r in range(len(counts)) if rows else [None]:
            n = float(counts[r] if rows else counts[0])
            if n < min_count:
                continue
            x = out[r] if rows else out
            d = x.numel()
            if d < 4:
                continue
            m = x / n
            avg = m.mean() if goal is None else (goal[r] if rows else goal).to(m)
            spread = float(((m - avg) ** 2).sum())
            tau2 = (sigma * scale / n) ** 2
            k = d - 3 if goal is None else d - 2
            factor = max(0.0, 1.0 - k * tau2 / spread) if spread > 0 else 0.0
            factors.append(factor)
            x.copy_((avg + factor * (m - avg)) * n)
        return out

    goals = target or {"means": [None] * len(clip), "seconds": [None] * len(clip)}
    kept = {} if kept is None else kept
    kept["means"], kept["seconds"] = [], []
    sums = [shrink(s, c, g, kept["means"]) for s, c, g in zip(summed["sums"], clip, goals["means"])]
    squares = [shrink(q, c * c, g, kept["seconds"]) for q, c, g in zip(summed["squares"], clip, goals["seconds"])]
    return {"sums": sums, "squares": squares, "counts": summed["counts"]}


@torch.no_grad()
def public_target(extract, images: torch.Tensor, clip: list[float], *, labels: torch.Tensor | None = None,
                  num_classes: int = 0, batch: int = 500) -> dict:  # fmt: skip
    """The shrinkage target of privacy.shrink = "public": the public images' means and raw second
    moments of the features clipped exactly as a private release clips them (per class with
    `labels`; a class without public images gets the average over all public images)."""
    sums, squares = feature_sums(extract, images, batch, lambda fs: [clip_rows(f, c) for f, c in zip(fs, clip)],
                                 labels, num_classes)  # fmt: skip
    if labels is None:
        n = float(len(images))
        return {"means": [(s / n).cpu() for s in sums], "seconds": [(q / n).cpu() for q in squares]}
    counts = torch.bincount(labels.long(), minlength=num_classes).double()[:, None]
    held = counts > 0

    def per_class(t: torch.Tensor) -> torch.Tensor:
        t = t.cpu()
        overall = t.sum(0, keepdim=True) / counts.sum()
        return torch.where(held, t / counts.clamp_min(1), overall)

    return {"means": [per_class(s) for s in sums], "seconds": [per_class(q) for q in squares]}


def check_target(target: dict, like: dict) -> None:
    """A shrinkage target (public_target) matches the sums it pulls (`like`: layers and shapes) and holds
    only finite float64 values: a StateError otherwise (on Flower it comes from partition 0's node)."""
    from prismfl.safestate import StateError, require

    require(target, {"means": list, "seconds": list}, "the shrinkage target")
    shapes = [t.shape for t in like["sums"]]
    for key in ("means", "seconds"):
        got = target[key]
        if not all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in got):
            raise StateError("the shrinkage target is not float64 tensors")
        if [t.shape for t in got] != shapes:
            raise StateError(f"the shrinkage target's {key} have shapes {[tuple(t.shape) for t in got]}, "
                             f"the sums {[tuple(x) for x in shapes]}")  # fmt: skip
        if not all(bool(torch.isfinite(t).all()) for t in got):
            raise StateError("the shrinkage target holds values that are not finite")


def stats_of_sum(summed: dict, num_classes: int) -> FeatureStats:
    """The statistics of summed noisy sums (pooled, or the secure sum of secagg.SecAggServer)."""
    counts = summed["counts"].double()
    return stats_from_sums(summed["sums"], summed["squares"], counts if num_classes else float(counts.reshape(-1)[0]))


def mix_stats(own: FeatureStats, pooled: FeatureStats, weight: float, *, all_classes: bool = False,
              min_count: float = 1.0) -> FeatureStats:  # fmt: skip
    """A client's targets: weight x pooled + (1 - weight) x own, for the means and the raw second
    moments (the variance follows). Per class: mixed where both hold the class (count >= min_count);
    own only where the pool lacks it; with `all_classes`, pooled alone for the classes the client
    lacks, and the class weights (counts) are the pool's, so every client aims at the global mix."""
    w = float(weight)
    shapes = [t.shape for t in (*own.mean, *own.var)], [t.shape for t in (*pooled.mean, *pooled.var)]
    if shapes[0] != shapes[1] or (own.class_counts is None) != (pooled.class_counts is None):
        raise ValueError("the pooled statistics do not match the client's own (layers, shapes or classes)")
    counts = None
    if own.class_counts is None:
        w_pool, w_own = w, 1 - w
    else:  # per class row: the weights of the pool and of its own statistics, and the row's count
        has_own = own.class_counts >= min_count
        has_pool = pooled.class_counts >= min_count
        w_pool = torch.where(has_own & has_pool, w, torch.where(has_own, 0.0, torch.where(has_pool, 1.0, 0.0)))
        if not all_classes:
            w_pool = w_pool * has_own
        pool_only = has_pool if all_classes else torch.zeros_like(has_pool)
        w_pool, w_own = w_pool[:, None], ((1 - w_pool) * has_own)[:, None]
        counts = torch.where(pool_only, pooled.class_counts, torch.where(has_own, own.class_counts, 0.0)).double()
    mean = [w_pool * p.double() + w_own * o.double() for p, o in zip(pooled.mean, own.mean)]
    second = [w_pool * p.double() + w_own * o.double() for p, o in zip(pooled.second, own.second)]
    var = [(q - m * m).clamp_min(0).float() for q, m in zip(second, mean)]
    count = own.count if counts is None else int(round(float(counts.clamp_min(0).sum())))
    return FeatureStats([m.float() for m in mean], var, count, counts)


def weak_classes(sums: list[torch.Tensor], counts: torch.Tensor, std: float,
                 names: list[str] | None = None) -> list[str]:  # fmt: skip
    """The classes (or class modes: `names` are the generator's conditions) a client holds whose release
    the noise would swamp: for some layer, the expected norm of the noise on the class's summed vector
    (std x sqrt(D_l)) exceeds the norm of that sum. Computed on the exact sums, before the noise, and
    only shown to the client itself (a warning)."""
    out = []
    for c in range(len(counts)):
        if counts[c] < 1:
            continue
        ratio = max(std * math.sqrt(s.shape[1]) / max(float(s[c].norm()), 1e-12) for s in sums)
        if ratio > 1:
            name = names[c] if names else f"class {c}"  # with model.modes > 1 a code: "Bag, mode 2"
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

    def release(self, ctx, images: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[FeatureStats | None, dict, object]:  # fmt: skip
        """(statistics, parameters, shared): with privacy.pool, `shared` is the release's noisy sums;
        with privacy.secagg, the client's side of secure aggregation, and no statistics of its own."""
        p, plan = ctx.cfg.privacy, budget(ctx.cfg)
        if p.secagg:
            from prismfl import secagg

            share = secagg.noise_share(ctx.cfg.partition.num_clients, p.dropouts, p.colluders)
            survivors = secagg.min_survivors(ctx.cfg.partition.num_clients, p.dropouts)
        else:
            share = 1.0
        release = private_feature_stats(lambda x: ctx.extract(x.to(ctx.device)), images, ctx.privacy_clip(),
                                        p.epsilon, p.delta, noise=plan.z("statistics"),
                                        labels=labels, num_classes=self.inner.spec.codes,
                                        class_names=ctx.fed.condition_names if ctx.fed is not None else None,
                                        second=ctx.cfg.loss.moment != "mean", noise_share=share,
                                        shrink=p.shrink, target=None if p.secagg else ctx.shrink_target())  # fmt: skip
        for warning in release.warnings:
            print(f"prismfl: warning: {warning}", file=sys.stderr, flush=True)
        summary = {**release.summary(), "epsilon": plan.epsilon}  # the run's guarantee: every release composed
        if "moments" in plan.noise:
            summary["moments_noise_multiplier"] = plan.z("moments")
        if p.secagg:
            summary.update(secagg=True, colluders=p.colluders, client_noise_std=summary["noise_std"] * share)
            if p.dropouts:
                summary["min_survivors"] = survivors
            client = secagg.SecAggClient.of_release(release.shared, release.clip, min_survivors=survivors,
                                                    colluders=p.colluders)  # fmt: skip
            return None, summary, client
        return release.stats, summary, release.shared if p.pool > 0 else None
