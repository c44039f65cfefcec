"""Precision, recall, density and coverage of generated embeddings against real ones.

Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models" (ICML 2020), with the
k-nearest-neighbour balls of Kynkäänniemi et al. (2019). With real X (N points), fake Y (M points)
and NND_k(p) the distance from p to its k-th nearest neighbour in its own set (itself excluded):

    precision = 1/M   sum_j  [ Y_j in some ball B(X_i, NND_k(X_i)) ]
    recall    = 1/N   sum_i  [ X_i in some ball B(Y_j, NND_k(Y_j)) ]
    density   = 1/(kM) sum_j  #{ i : Y_j in B(X_i, NND_k(X_i)) }
    coverage  = 1/N   sum_i  [ the nearest Y_j lies in B(X_i, NND_k(X_i)) ]

Balls are closed (distance <= radius); the authors' reference code uses <, which differs only for
exact ties. Distances are exact Euclidean, computed in row blocks so 10k x 10k never sits in memory.
"""

from __future__ import annotations

import numpy as np

from prismfl.errors import ConfigError

DEFAULT_K = 5
BLOCK = 1024  # rows per block: 1024 x 10k float64 distances = 80 MB


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _sq_dist_blocks(a: np.ndarray, b: np.ndarray, block: int):
    """Yield (start, squared distances of a[start:start+block] to all of b), clipped at 0."""
    nb = _sq_norms(b)
    for start in range(0, len(a), block):
        rows = a[start : start + block]
        d = _sq_norms(rows)[:, None] + nb[None, :] - 2.0 * (rows @ b.T)
        np.maximum(d, 0.0, out=d)
        yield start, d


def knn_radii(x: np.ndarray, k: int = DEFAULT_K, block: int = BLOCK) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in x, the point itself excluded."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(len(x))
    for start, d in _sq_dist_blocks(x, x, block):
        rows = np.arange(len(d))
        d[rows, start + rows] = -1.0  # the point itself sorts first (index 0), whatever rounding gave
        out[start : start + len(d)] = np.partition(d, k, axis=1)[:, k]
    return np.sqrt(out)


def prdc(real: np.ndarray, fake: np.ndarray, k: int = DEFAULT_K, block: int = BLOCK) -> dict:
    """{'precision', 'recall', 'density', 'coverage', 'k', 'n_real', 'n_fake'} for two (n, d) arrays."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ConfigError(f"PRDC needs two (n, d) arrays of one width, got {real.shape} and {fake.shape}")
    if k < 1:
        raise ConfigError(f"PRDC needs k >= 1, got {k}")
    if min(len(real), len(fake)) <= k:
        raise ConfigError(
            f"PRDC with k={k} needs more than {k} real and generated samples, got {len(real)} and {len(fake)}"
        )
    if not (np.isfinite(real).all() and np.isfinite(fake).all()):
        raise ConfigError("PRDC got non-finite embeddings (NaN or inf); the generator or feature net diverged")
    real_r2 = knn_radii(real, k, block) ** 2
    fake_r2 = knn_radii(fake, k, block) ** 2
    inside_count = np.zeros(len(fake), np.int64)  # per fake point: how many real balls contain it
    recalled = np.zeros(len(real), bool)  # per real point: inside some fake ball
    covered = np.zeros(len(real), bool)  # per real point: its nearest fake point is inside its ball
    for start, d in _sq_dist_blocks(real, fake, block):  # d[i, j] = |X_i - Y_j|^2
        stop = start + len(d)
        inside = d <= real_r2[start:stop, None]
        inside_count += inside.sum(0)
        recalled[start:stop] = (d <= fake_r2[None, :]).any(1)
        covered[start:stop] = d.min(1) <= real_r2[start:stop]
    return {
        "precision": float((inside_count > 0).mean()),
        "recall": float(recalled.mean()),
        "density": float(inside_count.sum() / (k * len(fake))),
        "coverage": float(covered.mean()),
        "k": k,
        "n_real": len(real),
        "n_fake": len(fake),
    }
