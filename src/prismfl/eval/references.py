"""Reference rows for every quality table: where "real" and where "trivial" lie on the same protocol.

- `real`: 10,000 training images (seeded draw), judged against the test images like any generator.
- `pca-gaussian`: a class-conditional Gaussian in the top principal components of the pooled
  training images, sampled with the training class shares. No federation, no privacy, no
  training: the sampler a statistician writes in ten lines. A generator that does not beat it
  has learned less than a closed-form fit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from prismfl.data.sources import load_split, to_float

REFERENCES = ("real", "pca-gaussian")
PCA_COMPONENTS = 50


def reference_images(name: str, dataset: str, n: int, seed: int = 0, root: str | None = None,
                     epsilon: float = math.inf, delta: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """n images in [-1, 1], (n, C, H, W), and their class labels, from the reference sampler `name`
    (`pca-gaussian` with a finite epsilon: its (epsilon, delta)-DP version, `dp_pca_gaussian`)."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; expected one of {REFERENCES}")
    if not math.isinf(epsilon) and name != "pca-gaussian":
        raise ValueError(f"only the pca-gaussian reference has a private version, not {name!r}")
    train = load_split(dataset, "train", root)
    gen = np.random.default_rng(seed)
    if not math.isinf(epsilon):
        return dp_pca_gaussian(to_float(train.images), train.labels, n, gen, epsilon, delta)
    if name == "real":
        idx = np.sort(gen.choice(len(train), size=min(n, len(train)), replace=False))
        return to_float(train.images[idx]), torch.from_numpy(train.labels[idx].astype(np.int64))
    return pca_gaussian(to_float(train.images), train.labels, n, gen)


def pca_gaussian(images: torch.Tensor, labels: np.ndarray, n: int, gen: np.random.Generator,
                 components: int = PCA_COMPONENTS) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per class c: x = mu + V a, a ~ N(mean_c, Cov_c) of the class's coordinates on the pooled top PCs V.
    Returns the images and their classes."""
    shape = images.shape[1:]
    x = images.reshape(len(images), -1).double().numpy()
    mu = x.mean(0)
    _, vecs = np.linalg.eigh(np.cov(x - mu, rowvar=False))
    basis = vecs[:, ::-1][:, : min(components, x.shape[1])]  # (D, k), largest variance first
    classes, sizes = np.unique(labels, return_counts=True)
    counts = gen.multinomial(n, sizes / len(labels))
    out = []
    for c, m in zip(classes, counts):
        coords = (x[labels == c] - mu) @ basis
        cov = np.cov(coords, rowvar=False) if len(coords) > 1 else np.zeros((basis.shape[1],) * 2)
        a = gen.multivariate_normal(coords.mean(0), cov, size=m, method="eigh")
        out.append(mu + a @ basis.T)
    order = gen.permutation(n)
    samples = np.concatenate(out)[order]
    classes_of = np.repeat(classes, counts)[order].astype(np.int64)
    return torch.from_numpy(samples.clip(-1, 1)).float().reshape(n, *shape), torch.from_numpy(classes_of)


DP_PUBLIC = 5000  # training images set aside as public: they fix the principal components and the clip bound


def dp_pca_gaussian(images: torch.Tensor, labels: np.ndarray, n: int, gen: np.random.Generator, epsilon: float,
                    delta: float, components: int = PCA_COMPONENTS, public: int = DP_PUBLIC,
                    clip_multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The pca-gaussian reference released with (epsilon, delta)-DP by prismfl's mechanism (docs/privacy.md).

    A seeded `public` images give the mean image, the top principal components V and the clip bound C
    (clip_multiplier x their median coordinate norm); they are not private. For each of the other
    images, u = clip(V^T (x - mean), C) / C; per class c, the release is the noisy sums of u, of u u^T
    and of the count (r(x) = [u, u u^T, 1] in class c's block: ||r(x)|| <= sqrt(3), the sensitivity),
    Gaussian noise of std z sqrt(3) from dp-accounting's calibration, drawn from the OS's entropy.
    Everything after is post-processing: class means and covariances (projected onto the positive
    semi-definite cone) from the noisy sums, classes whose noisy count is under 3 noise deviations
    dropped, class shares from the noisy counts, then sampling as `pca_gaussian`."""
    import secrets

    from prismfl.privacy import noise_multiplier

    if len(images) <= public:
        raise ValueError(f"the private pca-gaussian sets {public:,} images aside as public; it needs more than that")
    shape = images.shape[1:]
    x = images.reshape(len(images), -1).double().numpy()
    order = gen.permutation(len(x))
    pub, priv = x[order[:public]], x[order[public:]]
    mu = pub.mean(0)
    _, vecs = np.linalg.eigh(np.cov(pub - mu, rowvar=False))
    basis = vecs[:, ::-1][:, : min(components, x.shape[1])]
    clip = clip_multiplier * float(np.median(np.linalg.norm((pub - mu) @ basis, axis=1)))
    coords = (priv - mu) @ basis
    u = coords * np.minimum(1.0, clip / np.maximum(np.linalg.norm(coords, axis=1, keepdims=True), 1e-12)) / clip
    y = labels[order[public:]]
    classes = int(labels.max()) + 1
    k = basis.shape[1]
    std = noise_multiplier(epsilon, delta) * math.sqrt(3)
    noise = np.random.default_rng(secrets.randbits(63))
    means, covs, counts = [], [], []
    for c in range(classes):
        uc = u[y == c]
        s1 = uc.sum(0) + std * noise.standard_normal(k)
        s2 = uc.T @ uc + std * noise.standard_normal((k, k))
        count = len(uc) + std * noise.standard_normal()
        counts.append(count)
        m = max(count, 1.0)
        mean = s1 / m
        cov = (s2 + s2.T) / 2 / m - np.outer(mean, mean)
        w, v = np.linalg.eigh(cov)
        means.append(mean * clip)
        covs.append((v * np.clip(w, 0, None)) @ v.T * clip * clip)
    counts = np.array(counts)
    kept = counts >= 3 * std
    if not kept.any():
        raise ValueError(f"epsilon={epsilon}: no class's noisy count is above the noise")
    shares = np.where(kept, counts, 0) / counts[kept].sum()
    per_class = gen.multinomial(n, shares)
    out = [mu + gen.multivariate_normal(means[c], covs[c], size=m, method="eigh") @ basis.T
           for c, m in enumerate(per_class)]  # fmt: skip
    perm = gen.permutation(n)
    samples = np.concatenate(out)[perm]
    classes_of = np.repeat(np.arange(classes), per_class)[perm].astype(np.int64)
    return torch.from_numpy(samples.clip(-1, 1)).float().reshape(n, *shape), torch.from_numpy(classes_of)
