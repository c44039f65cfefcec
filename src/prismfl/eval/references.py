"""Reference rows for every quality table: where "real" and where "trivial" lie on the same protocol.

- `real`: 10,000 training images (seeded draw), judged against the test images like any generator.
- `pca-gaussian`: a class-conditional Gaussian in the top principal components of the pooled
  training images, sampled with the training class shares. No federation, no privacy, no
  training: the sampler a statistician writes in ten lines. A generator that does not beat it
  has learned less than a closed-form fit.
"""

from __future__ import annotations

import numpy as np
import torch

from prismfl.data.sources import load_split, to_float

REFERENCES = ("real", "pca-gaussian")
PCA_COMPONENTS = 50


def reference_images(name: str, dataset: str, n: int, seed: int = 0,
                     root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """n images in [-1, 1], (n, C, H, W), and their class labels, from the reference sampler `name`."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; expected one of {REFERENCES}")
    train = load_split(dataset, "train", root)
    gen = np.random.default_rng(seed)
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
