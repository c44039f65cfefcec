"""Which clients take part in a round: all of them, or a seeded random train.client_fraction."""

from __future__ import annotations

import numpy as np

from prismfl.config import RunConfig
from prismfl.seeds import derived_seed


def clients_per_round(cfg: RunConfig) -> int:
    """How many clients a round chooses: train.client_fraction of them, at least one."""
    return max(1, round(cfg.train.client_fraction * cfg.partition.num_clients))


def select_clients(cfg: RunConfig, round_: int) -> list[int]:
    """Clients taking part in a round: all, or a seeded random fraction (at least one)."""
    k = cfg.partition.num_clients
    m = clients_per_round(cfg)
    if m == k:
        return list(range(k))
    rng = np.random.default_rng(derived_seed(cfg.seed, "select", round_))
    return sorted(rng.choice(k, size=m, replace=False).tolist())
