"""A run's federation: its training split, the public hold-out no client holds and each client's partition.

Built from a RunConfig by `prepare_federation`; shared by the in-process simulator and the Flower apps, so both
hold exactly the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from prismfl.data.partition import class_table, partition
from prismfl.data.sources import Split, dataset_info, load_split, to_float
from prismfl.seeds import derived_seed


@dataclass
class Federation:
    """The training split, who holds what, and the public hold-out no client holds."""

    cfg: Any  # the run's RunConfig (prismfl.config sits above the data layer: not imported here)
    train: Split
    public_idx: np.ndarray
    parts: list[np.ndarray]
    # model.modes without public images, on Flower: the modes the server fitted on the nodes' moment sums
    # (a node must not read the other partitions' images to fit them itself)
    given_modes: object | None = None

    @property
    def num_classes(self) -> int:
        return int(self.train.labels.max()) + 1

    @property
    def class_names(self) -> list[str]:
        return list(dataset_info(self.cfg.data.dataset).class_names)

    @property
    def condition_names(self) -> list[str]:
        """The names of the generator's conditions, in code order: the classes, or with model.modes > 1
        each class's modes ("Bag, mode 2")."""
        k = self.cfg.model.modes
        return self.class_names if k == 1 else [f"{name}, mode {m + 1}" for name in self.class_names for m in range(k)]

    @cached_property
    def table(self) -> np.ndarray:
        return class_table(self.train.labels, self.parts, self.num_classes)

    def images(self, idx: np.ndarray) -> torch.Tensor:
        return to_float(self.train.images[idx], self.cfg.data.resize or None)

    def client_images(self, k: int) -> torch.Tensor:
        return self.images(self.parts[k])

    def labels(self, idx: np.ndarray) -> torch.Tensor:
        """The generator's condition of these images: their classes, or with model.modes > 1 their codes
        (class * modes + the nearest of the class's modes fitted on the public hold-out)."""
        if self.cfg.model.modes > 1:
            return torch.from_numpy(self.codes[idx])
        return torch.from_numpy(self.train.labels[idx].astype(np.int64))

    @cached_property
    def modes(self):
        """The modes of model.modes (data/modes.py): given by the server (Flower), fitted on the public
        images, or taken from the moments the clients release (principal_modes)."""
        from prismfl.data.modes import fit_modes, principal_modes, sum_moments

        pub, k = self.public_idx, self.cfg.model.modes
        if self.given_modes is not None:
            return self.given_modes
        if len(pub):
            return fit_modes(self.train.images[pub], self.train.labels[pub], self.num_classes, k,
                             derived_seed(self.cfg.seed, "modes"), scale=1 / 255)  # fmt: skip
        # the server sums what each client released: its per-class counts, sums and outer products
        return principal_modes(sum_moments([self.moments(i) for i in range(len(self.parts))]), k,
                               self.train.images.shape[1:])  # fmt: skip

    @cached_property
    def codes(self) -> np.ndarray:
        """Every training image's condition code under model.modes (data/modes.py): the modes are fitted on
        the public images or, without them, taken from the moments the clients release (principal_modes);
        a client computes its own images' codes from them (in one process: all at once)."""
        return self.modes.codes(self.train.images, self.train.labels, scale=1 / 255)

    def moments(self, k: int) -> dict:
        """What client k releases for the federation's modes (data/modes.py moment_sums)."""
        from prismfl.data.modes import moment_sums

        idx = self.parts[k]
        return moment_sums(self.train.images[idx], self.train.labels[idx], self.num_classes, 1 / 255)


def prepare_federation(cfg) -> Federation:
    """Load the training split of `cfg` (a RunConfig), hold out the public images, partition the rest among
    clients."""
    train = load_split(cfg.data.dataset, "train", cfg.data.root or None)
    if cfg.data.subset and cfg.data.subset < len(train):
        keep = np.sort(
            np.random.default_rng(derived_seed(cfg.seed, "subset")).permutation(len(train))[: cfg.data.subset]
        )
        train = Split(train.images[keep], train.labels[keep], f"{train.source}, random subset of {cfg.data.subset:,}")
    holdout = cfg.public_images()
    if holdout >= len(train):
        from prismfl.errors import ConfigError

        raise ConfigError(f"partition.public_holdout = {holdout} leaves no images for clients (have {len(train)})")
    order = np.random.default_rng(derived_seed(cfg.seed, "public-holdout")).permutation(len(train))
    public_idx, private_idx = np.sort(order[:holdout]), order[holdout:]
    p = cfg.partition
    local = partition(
        train.labels[private_idx],
        p.num_clients,
        p.scheme,
        seed=derived_seed(cfg.seed, "partition"),
        shards_per_client=p.shards_per_client,
        alpha=p.alpha,
    )
    return Federation(cfg, train, public_idx, [np.sort(private_idx[i]) for i in local])
