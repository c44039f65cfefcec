"""Split a training set across clients: iid, label shards (the paper's), Dirichlet(alpha), and by a
binary attribute (the paper's CelebA split: half the clients male-only, half female-only)."""

from __future__ import annotations

import numpy as np

from prismfl.errors import ConfigError

SCHEMES = ("iid", "shards", "dirichlet", "attribute")


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "shards",
    *,
    seed: int = 0,
    shards_per_client: int = 4,
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """Indices for each client: disjoint, covering every image exactly once, seeded."""
    n = len(labels)
    if num_clients < 1:
        raise ConfigError(f"partition.num_clients must be at least 1, got {num_clients}")
    if num_clients > n:
        raise ConfigError(f"{num_clients} clients but only {n} training images; use fewer clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "shards":
        parts = _shards(labels, num_clients, shards_per_client, rng)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, alpha, rng)
    elif scheme == "attribute":
        parts = _attribute(labels, num_clients, rng)
    else:
        raise ConfigError(f"unknown partition scheme {scheme!r}; expected one of {SCHEMES}")
    return [np.sort(p).astype(np.int64) for p in parts]


def _shards(labels, num_clients, per_client, rng) -> list[np.ndarray]:
    """Sort by label, cut into num_clients*per_client equal shards, deal per_client to each."""
    if per_client < 1:
        raise ConfigError(f"partition.shards_per_client must be at least 1, got {per_client}")
    total = num_clients * per_client
    if total > len(labels):
        raise ConfigError(f"{total} shards need at least {total} images, have {len(labels)}")
    order = np.lexsort((rng.permutation(len(labels)), labels))  # by label, ties in random order
    shards = np.array_split(order, total)
    deal = rng.permutation(total).reshape(num_clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in deal]


def _dirichlet(labels, num_clients, alpha, rng, min_size: int = 1) -> list[np.ndarray]:
    """Per class, split its images among clients by proportions drawn from Dirichlet(alpha)."""
    if not alpha > 0:
        raise ConfigError(f"partition.alpha must be > 0, got {alpha}")
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.concatenate(p) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ConfigError(f"Dirichlet(alpha={alpha}) keeps leaving a client empty; raise alpha or use fewer clients")


def _attribute(labels, num_clients, rng) -> list[np.ndarray]:
    """Binary labels (0/1): the first clients hold only label 0, the others only label 1, half and half.

    With an odd number of clients the more numerous label gets the extra client. Within a label the
    images are shuffled and dealt in near-equal parts.
    """
    values = np.unique(labels)
    if not set(values.tolist()) <= {0, 1}:
        raise ConfigError(
            f"partition.scheme = 'attribute' needs a binary label (0/1, e.g. CelebA's Male attribute); "
            f"these labels have {len(values)} classes: use 'iid', 'shards' or 'dirichlet'"
        )
    if num_clients < 2:
        raise ConfigError("partition.scheme = 'attribute' needs at least 2 clients (one per attribute value)")
    counts = np.bincount(labels, minlength=2)
    ones = num_clients // 2 if counts[1] <= counts[0] else num_clients - num_clients // 2
    parts: list[np.ndarray] = []
    for value, k in ((0, num_clients - ones), (1, ones)):
        if counts[value] < k:
            raise ConfigError(
                f"partition.scheme = 'attribute' gives {k} clients label {value}, but only {counts[value]} "
                f"images have it; use fewer clients"
            )
        parts.extend(np.array_split(rng.permutation(np.flatnonzero(labels == value)), k))
    return parts


def class_table(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Client x class counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def format_class_table(table: np.ndarray, class_names: list[str] | None = None) -> str:
    names = class_names or [str(i) for i in range(table.shape[1])]
    width = max(6, *(len(n) for n in names))
    head = "client " + " ".join(f"{n[:width]:>{width}}" for n in names) + f" {'total':>7}"
    rows = [f"{k:>6} " + " ".join(f"{v:>{width}}" for v in row) + f" {row.sum():>7}" for k, row in enumerate(table)]
    return "\n".join([head, *rows])
