"""Sub-class modes (model.modes, beyond the paper): every class split into K modes by k-means on public images.

A class-conditional generator matched to one class's mean and variance draws that class's average
garment with little variety (recall near 0.003). With modes, the generator's condition is
(class, mode) and the clients match the statistics of each mode: a bag with a handle and a bag without one
become two targets, so the generator must draw both. The modes are fitted on the public hold-out only (the
images the public feature net learns from; no client's data, no privacy cost): per class, k-means on the
coordinates of the class's top principal components. A client puts each of its images in the mode whose
centre is nearest; as with classes, each image adds to one mode's statistics only, so a private release's
sensitivity is unchanged. The condition code of class c, mode m is c * K + m.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.vq import kmeans2

COMPONENTS = 50  # principal components per class the modes are clustered in (at most the class's images - 1)


@dataclass
class Modes:
    """Per class: the public images' mean (D,), top principal directions (D, d) and mode centres (K, d)."""

    k: int
    means: list[np.ndarray]
    bases: list[np.ndarray]
    centres: list[np.ndarray | None]  # None: the class had too few public images: all its images are mode 0

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The modes as four float64 arrays (what a server sends its nodes): means (classes, D), bases
        (classes, D, d), centres (classes, K, d) and `fitted` (classes,): 1 where the class has K modes."""
        d = self.bases[0].shape[1]
        zeros = np.zeros((self.k, d))
        return {"means": np.stack(self.means), "bases": np.stack(self.bases),
                "centres": np.stack([zeros if c is None else c for c in self.centres]),
                "fitted": np.array([c is not None for c in self.centres], dtype=np.float64)}  # fmt: skip

    @classmethod
    def from_arrays(cls, arrays, k: int, num_classes: int, size: int) -> Modes:
        """The inverse of to_arrays, for K modes of `num_classes` classes of images of `size` values; a
        ValueError for anything else (the arrays came over the network)."""
        if not isinstance(arrays, dict) or sorted(arrays) != ["bases", "centres", "fitted", "means"]:
            raise ValueError("modes must be a table of means, bases, centres and fitted")
        if not all(isinstance(a, np.ndarray) and a.dtype == np.float64 and np.isfinite(a).all()
                   for a in arrays.values()):  # fmt: skip
            raise ValueError("modes must be finite float64 arrays")
        means, bases, centres, fitted = (arrays[key] for key in ("means", "bases", "centres", "fitted"))
        d = bases.shape[-1] if bases.ndim == 3 else 0
        if (means.shape != (num_classes, size) or bases.shape != (num_classes, size, d) or not 1 <= d <= COMPONENTS
                or centres.shape != (num_classes, k, d) or fitted.shape != (num_classes,)
                or not np.isin(fitted, (0.0, 1.0)).all()):  # fmt: skip
            raise ValueError(f"modes of other shapes than {k} modes of {num_classes} classes of {size} values")
        if max(np.abs(means).max(), np.abs(bases).max(), np.abs(centres).max()) > 1e6:
            raise ValueError("modes with values beyond +-1e6")
        return cls(k, list(means), list(bases), [c if f else None for c, f in zip(centres, fitted)])

    def codes(self, images: np.ndarray, labels: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """The condition code (label * k + nearest mode) of every image; images (N, ...) times `scale`
        in [0, 1] (uint8 images: scale 1/255; converted a class at a time)."""
        flat = images.reshape(len(images), -1)
        labels = np.asarray(labels, dtype=np.int64)
        if flat.shape[1] != self.means[0].shape[0] or len(labels) != len(flat):
            raise ValueError(f"modes fitted on images of {self.means[0].shape[0]} values; got {flat.shape[1:]}, "
                             f"{len(labels)} labels for {len(flat)} images")  # fmt: skip
        if len(labels) and not (0 <= labels.min() and labels.max() < len(self.means)):
            raise ValueError(f"labels must be in 0..{len(self.means) - 1}")
        out = labels * self.k
        for c, (mean, basis, centres) in enumerate(zip(self.means, self.bases, self.centres)):
            rows = np.flatnonzero(labels == c)
            if centres is None or not len(rows):
                continue
            coords = (flat[rows].astype(np.float64) * scale - mean) @ basis
            out[rows] += ((coords[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        return out


def fit_modes(images: np.ndarray, labels: np.ndarray, num_classes: int, k: int, seed: int,
              scale: float = 1.0) -> Modes:  # fmt: skip
    """K modes per class from (public) images times `scale` in [0, 1]: k-means++ (scipy) on the top principal
    coordinates of each class. A class with fewer than 2k images keeps one mode (all its images mode 0)."""
    if k < 1:
        raise ValueError(f"modes must be >= 1, got {k}")
    flat = images.reshape(len(images), -1).astype(np.float64) * scale
    labels = np.asarray(labels, dtype=np.int64)
    means, bases, centres = [], [], []
    for c in range(num_classes):
        x = flat[labels == c]
        mean = x.mean(0) if len(x) else np.zeros(flat.shape[1])
        basis, centre = np.zeros((flat.shape[1], 1)), None
        if k > 1 and len(x) >= 2 * k:
            _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
            basis = vt[: min(COMPONENTS, len(x) - 1)].T
            centre, _ = kmeans2((x - mean) @ basis, k, iter=50, minit="++", seed=np.random.default_rng([seed, c]))
        means.append(mean)
        bases.append(basis)
        centres.append(centre)
    return Modes(k, means, bases, centres)


MODE_POOL = 2  # the federation's modes look at images average-pooled 2 x 2 (a 28 x 28 image: 196 values)


def pooled_pixels(images: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Images (N, C, H, W) times `scale`, average-pooled MODE_POOL x MODE_POOL and flattened, float64."""
    n, c, h, w = images.shape
    p = MODE_POOL
    x = images.astype(np.float64).reshape(n, c, h // p, p, w // p, p).mean((3, 5)) * scale
    return x.reshape(n, -1)


def moment_sums(images: np.ndarray, labels: np.ndarray, num_classes: int, scale: float = 1.0,
                clip: float | None = None) -> dict:  # fmt: skip
    """What a client releases for the federation's modes: per class its image count, the sum of its pooled
    images (classes, d) and of their outer products (classes, d, d), float64. Summed over clients, they
    are the federation's per-class means and covariances at that resolution. Each outer product is exactly
    symmetric (its lower triangle mirrored: what eigh reads), so its lower triangle is all a client sends.
    `clip`: each pooled image scaled down to L2 norm <= clip first (a private release's sensitivity)."""
    x, labels = pooled_pixels(images, scale), np.asarray(labels, dtype=np.int64)
    if clip is not None:
        x = x * np.minimum(1.0, clip / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    d = x.shape[1]
    sums = {"counts": np.zeros(num_classes), "sums": np.zeros((num_classes, d)), "outer": np.zeros((num_classes, d, d))}
    for c in range(num_classes):
        xc = x[labels == c]
        outer = xc.T @ xc
        sums["counts"][c], sums["sums"][c], sums["outer"][c] = len(xc), xc.sum(0), np.tril(outer) + np.tril(outer, -1).T
    return sums


def sum_moments(parts: list[dict]) -> dict:
    """The federation's moments: the clients' moment_sums added in client order (the same float64 sums
    on every transport)."""
    return {key: sum(part[key] for part in parts) for key in parts[0]}


NOISY_LIMIT = 2.0**40  # the largest magnitude a private release's noisy moment sums may hold


def check_moments(sums, num_classes: int, d: int, private: bool = False) -> dict:
    """A client's moment_sums as it came over the network: counts (classes,) of whole numbers, sums
    (classes, d) and outer products (classes, d, d), float64, each class's within what that many images
    in [0, 1] can add up to; with `private` (a Gaussian release: any sign, any fraction) finite and within
    +-NOISY_LIMIT. A ValueError otherwise."""
    if not isinstance(sums, dict) or sorted(sums) != ["counts", "outer", "sums"]:
        raise ValueError("moment sums must be a table of counts, sums and outer")
    shapes = {"counts": (num_classes,), "sums": (num_classes, d), "outer": (num_classes, d, d)}
    out = {}
    for key, shape in shapes.items():
        value = sums[key]
        if not (isinstance(value, np.ndarray) and value.dtype == np.float64 and value.shape == shape):
            raise ValueError(f"moment {key} must be float64 of shape {shape}")
        out[key] = value
    counts = out["counts"]
    if private:
        if not all(np.isfinite(v).all() and np.abs(v).max(initial=0) <= NOISY_LIMIT for v in out.values()):
            raise ValueError(f"noisy moment sums must be finite and within +-{NOISY_LIMIT:g}")
        return out
    if not (np.isfinite(counts).all() and (counts >= 0).all() and (counts <= 2**40).all()
            and (counts == np.round(counts)).all()):  # fmt: skip
        raise ValueError("moment counts must be whole numbers of images")
    for key in ("sums", "outer"):
        v = out[key].reshape(num_classes, -1)
        if not (np.isfinite(v).all() and (v >= 0).all() and (v <= counts[:, None]).all()):
            raise ValueError(f"moment {key} must lie within what the class's images can add up to")
    return out


def principal_modes(sums: dict, k: int, shape: tuple[int, int, int]) -> Modes:
    """K modes per class from the federation's summed moments (moment_sums over every client): K slices
    along the class's first principal direction (of its pooled images), each centred at the mean of its
    slice of a Gaussian of that direction's variance (the slices hold about equal shares of the class). No
    image is needed: only the sums the clients released. A class with fewer than 2k images keeps one mode."""
    from scipy.stats import norm

    c_, h, w = shape
    p = MODE_POOL
    edges = norm.ppf(np.arange(k + 1) / k)  # -inf, the k - 1 quantiles, inf
    unit = (norm.pdf(edges[:-1]) - norm.pdf(edges[1:])) * k  # each slice's mean, in standard deviations
    means, bases, centres = [], [], []
    for n, s, o in zip(sums["counts"], sums["sums"], sums["outer"]):
        mean = s / max(n, 1.0)
        vals, vecs = np.linalg.eigh(o / max(n, 1.0) - np.outer(mean, mean))
        up = lambda v: np.repeat(np.repeat(v.reshape(c_, h // p, w // p), p, 1), p, 2).reshape(-1)  # noqa: E731
        means.append(up(mean))
        bases.append((up(vecs[:, -1]) / (p * p))[:, None])  # x . basis = the pooled image's coordinate
        centres.append(unit[:, None] * np.sqrt(max(vals[-1], 0.0)) if k > 1 and n >= 2 * k else None)
    return Modes(k, means, bases, centres)
