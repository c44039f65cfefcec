"""From a RunConfig to the pieces a federation needs: data per client, model, feature net, losses.

Shared by the in-process simulator and the Flower apps, so both build exactly the same thing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from prismfl.config import RunConfig
from prismfl.data.partition import class_table, partition
from prismfl.data.sources import Split, dataset_info, load_split, to_float
from prismfl.loss.matching import ConditionalMatching, FeatureStats, MeanVarMatching
from prismfl.model import masked
from prismfl.model.generators import ArchSpec, build_generator
from prismfl.shipped import Shipped, load_shipped


def derived_seed(*keys) -> int:
    """A 63-bit seed from any tuple of keys: every random stream of a run is named, not shared."""
    digest = hashlib.sha256(":".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator_for(*keys, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(*keys))


def arch_spec(cfg: RunConfig) -> ArchSpec:
    return cfg.arch_spec()


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from prismfl.errors import ConfigError

        raise ConfigError("train.device = 'cuda' but PyTorch sees no GPU; use 'auto' or 'cpu'")
    return name


@dataclass
class Federation:
    """The training split, who holds what, and the public hold-out no client holds."""

    cfg: RunConfig
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


def prepare_federation(cfg: RunConfig) -> Federation:
    """Load the training split, hold out the public images, partition the rest among clients."""
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


def build_model(cfg: RunConfig, device: str = "cpu") -> torch.nn.Module:
    model = build_generator(arch_spec(cfg)).to(device)
    masked.configure(model, estimator=cfg.model.estimator)
    return model


def model_layout(model: torch.nn.Module) -> tuple[int, int]:
    """(maskable weights N, layer-table hash): what server and clients check they agree on."""
    from prismfl.fl.wire import layer_table_hash

    return masked.num_maskable(model), layer_table_hash(masked.layer_table(model))


def initial_scores(cfg: RunConfig, n: int) -> torch.Tensor:
    """Global scores of round 0: N(0, 1) from the run seed (METHOD.md §2)."""
    return torch.randn(n, generator=generator_for(cfg.seed, "initial-scores"))


def privacy_clip(cfg: RunConfig, fed: Federation, extract, device: str = "cpu") -> list[float]:
    """Per-layer clip bounds from images that are not private: the public hold-out when there is
    one, otherwise samples of the untrained generator (which depend on the seed alone)."""
    from prismfl.privacy import clip_bounds

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


def client_loss(cfg: RunConfig, stats: FeatureStats, device: str = "cpu",
                privacy: dict | None = None) -> MeanVarMatching:  # fmt: skip
    """The client's matching loss; per class for a conditional model, over the classes it holds: with
    privacy, those whose noisy count is above three noise deviations (post-processing of the release)."""
    loss = cfg.loss
    options = {"tracker": loss.tracker, "tracker_beta": loss.tracker_beta, "tracker_lr": loss.tracker_lr}
    if privacy and loss.moment == "mean":  # no variances released: each layer weighed by its public clip bound
        options["scales"] = privacy["clip"]
    if not cfg.model.conditional:
        return MeanVarMatching(stats, loss.moment, **options).to(device)
    from prismfl.privacy import min_count

    return ConditionalMatching(stats, loss.moment, min_count=min_count(privacy),
                               codes_per_step=loss.codes_per_step, **options).to(device)  # fmt: skip


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


PUBLIC_EPOCHS = 10
# the public feature net's cache version: 2 draws its initial weights from the run's seed (1 did not, so two
# machines trained different nets for one seed; the figures measured before 2026-11-26 afternoon used 1)
PUBLIC_NET_VERSION = 2
PUBLIC_NET = "the public feature net"
# Public feature nets that ship with prismfl (shipped.py), by `shipped_key`: the privileged setting's
# (configs/fmnist-public.toml and every config with its data, partition, seed and loss.feature_* settings),
# the net this machine's benchmarks have trained with since 2026-11-26, so a run of it skips about 2.5
# minutes of training and trains the same model on every machine. Any other net is trained and cached.
SHIPPED_PUBLIC_NETS = {
    "a9b83fb6c4f00d8357e3503f4e974522abe2806f1886e3a806863f14ab892ef3": Shipped(
        "public-fashion-mnist-w32-seed0.safetensors", "9f3a8219358036d36d71c6def26e5675aa0388786123be395c00aadcb49a1536"
    ),
}


def shipped_key(spec: dict, images: torch.Tensor, labels: np.ndarray) -> str:
    """A public feature net's key in SHIPPED_PUBLIC_NETS: the sha256 of its cache spec without where the
    data was read from, with the sha256 of the exact public images (float32) and labels it trains on."""
    data = hashlib.sha256(images.numpy().astype("<f4").tobytes())
    data.update(labels.astype("<i8").tobytes())
    recipe = {**{k: v for k, v in spec.items() if k != "source"}, "data_sha256": data.hexdigest()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def load_shipped_public_net(key, net) -> dict:
    """Load the shipped public feature net of `key` (from shipped_key, or from a recipe another process
    wrote) into `net`; what the run records of it. A PrismError for a key this prismfl does not ship."""
    from prismfl.errors import PrismError

    if not isinstance(key, str) or key not in SHIPPED_PUBLIC_NETS:
        raise PrismError(f"{PUBLIC_NET} {str(key)[:80]!r} does not ship with this prismfl")
    shipped = SHIPPED_PUBLIC_NETS[key]
    load_shipped(shipped, net, PUBLIC_NET)
    return {"sha256": shipped.sha256, "weights": f"shipped with prismfl ({shipped.file})"}


def feature_training(cfg: RunConfig) -> dict:
    """train_classifier's arguments for the public feature net (loss.feature_training): "plain", 10
    epochs of Adam at 1e-3; "augmented", 30 epochs of one-cycle AdamW (peak 3e-3, weight decay 0.05) on
    batches shifted by up to 2 pixels and, where the dataset allows it, mirrored (docs/quality.md: each
    recipe's test accuracy and what it does to the samples); loss.feature_epochs, when set, replaces the
    recipe's number of epochs."""
    recipe = cfg.loss.feature_training
    one_cycle = {"lr": 3e-3, "weight_decay": 0.05, "one_cycle": True}
    if recipe == "plain":
        args = {"epochs": PUBLIC_EPOCHS}
    else:
        data = cfg.data.dataset if cfg.loss.feature_data == "holdout" else cfg.loss.feature_data
        args = {"epochs": 30, **one_cycle, "shift": 2, "mirror": dataset_info(data).mirror}
    return {**args, "epochs": cfg.loss.feature_epochs or args["epochs"]}


def public_feature_data(cfg: RunConfig, fed: Federation) -> tuple[torch.Tensor, np.ndarray, str, str]:
    """The public feature net's images (float, at the run's size), labels, source and a description:
    the federation's public hold-out, or every training image of loss.feature_data's dataset (another
    distribution than the clients'; a ConfigError when its images are not the clients' shape)."""
    if cfg.loss.feature_data == "holdout":
        idx = fed.public_idx
        what = f"{len(idx)} held-out training images no client holds"
        return fed.images(idx), fed.train.labels[idx], fed.train.source, what
    other = load_split(cfg.loss.feature_data, "train")
    images = to_float(other.images, cfg.data.resize or None)
    theirs = tuple(fed.images(fed.parts[0][:1]).shape[1:])
    if tuple(images.shape[1:]) != theirs:
        from prismfl.errors import ConfigError

        raise ConfigError(f"loss.feature_data = {cfg.loss.feature_data!r} has images of shape "
                          f"{tuple(images.shape[1:])}, the clients' are {theirs}")  # fmt: skip
    what = f"{len(other.labels):,} images of {cfg.loss.feature_data} ({other.source})"
    return images, other.labels, other.source, what


def train_public_net(cfg: RunConfig, images: torch.Tensor, labels: np.ndarray, desc: str = "public feature net"):
    """The loss's public feature net trained on public images (never client data: public_feature_data)
    by the config's recipe (feature_training); not cached: build_feature_net caches it."""
    from prismfl.loss.features import seeded_cnn
    from prismfl.supervised import train_classifier

    # its initial weights from the run's seed (version 1 drew them from the process's unseeded generator)
    classes = int(labels.max()) + 1
    net = seeded_cnn(images.shape[1], cfg.loss.feature_width, classes, derived_seed(cfg.seed, "public-features"))
    return train_classifier(net, images, torch.from_numpy(labels.astype(np.int64)), seed=cfg.seed, desc=desc,
                            **feature_training(cfg))  # fmt: skip


def build_feature_net(cfg: RunConfig, fed: Federation, device: str = "cpu", log=print):
    """The loss's feature network, a record of what it was trained on (never client data), and a
    recipe from which `feature_net_from_recipe` rebuilds it without loading any data."""
    from prismfl.cache import cached_state_dict
    from prismfl.loss.features import SmallCNN, load_vgg19bn, random_cnn

    channels = fed.train.images.shape[1]
    kind = cfg.loss.features
    recipe = {"kind": kind, "channels": int(channels), "classes": fed.num_classes}
    if kind == "random":
        net = random_cnn(channels, cfg.loss.feature_width, derived_seed(cfg.seed, "random-features"))
        meta = {"kind": "random", "trained_on": "nothing (seeded random weights)"}
    elif kind == "vgg19bn":
        net = load_vgg19bn(cfg.loss.vgg_weights)
        meta = {"kind": "vgg19bn", "trained_on": f"user-supplied weights {cfg.loss.vgg_weights}"}
    else:
        images, labels, source, what = public_feature_data(cfg, fed)
        recipe["classes"] = int(labels.max()) + 1
        holdout = hashlib.sha256(fed.public_idx.astype("<i8").tobytes()).hexdigest()
        recipe_args = feature_training(cfg)
        spec = {
            "kind": "public-cnn", "version": PUBLIC_NET_VERSION, "dataset": cfg.data.dataset,
            "source": source, "resize": cfg.data.resize, "holdout_sha256": holdout,
            "width": cfg.loss.feature_width, "epochs": recipe_args["epochs"], "seed": cfg.seed,
        }  # fmt: skip
        if cfg.loss.feature_data != "holdout":  # another distribution's data: its name and every image it holds
            spec.update(dataset=cfg.loss.feature_data, holdout_sha256=None)
        if cfg.loss.feature_training != "plain":  # the plain recipe's spec is as it always was, bar the version
            spec.update(training=cfg.loss.feature_training, **recipe_args)

        def build():
            log(f"training the public feature net on {what} (cached afterwards)")
            trained = train_public_net(cfg, images, labels)
            return trained.state_dict(), {"trained_on_indices_sha256": holdout, "images": len(labels)}

        clients = np.concatenate(fed.parts)
        if np.intersect1d(clients, fed.public_idx).size:
            raise RuntimeError("public hold-out overlaps client data: refusing to train the loss on private images")
        net = SmallCNN(channels, cfg.loss.feature_width, recipe["classes"])
        key = shipped_key(spec, images, labels)
        if key in SHIPPED_PUBLIC_NETS:
            meta = {"kind": "public", "trained_on": what, **load_shipped_public_net(key, net)}
            recipe["shipped"] = key
        else:
            state, meta = cached_state_dict("features", spec, build, log)
            if meta.get("trained_on_indices_sha256") != holdout:
                raise RuntimeError("the cached public feature net was trained on other images; delete the cache entry")
            net.load_state_dict(state)
            meta = {"kind": "public", "trained_on": what, "sha256": meta["sha256"]}
        recipe["cache_spec"] = spec
    return ready_feature_net(cfg, net, device), meta, recipe


def feature_net_from_recipe(cfg: RunConfig, recipe: dict, device: str = "cpu"):
    """The feature net `build_feature_net` made, without the data: from the seed, the user's weights
    file, the weights shipped with prismfl or this machine's cache (a missing or altered cache entry or
    shipped file is a PrismError, never a rebuild)."""
    from prismfl.loss.features import SmallCNN, load_vgg19bn, random_cnn

    if recipe["kind"] == "random":
        net = random_cnn(recipe["channels"], cfg.loss.feature_width, derived_seed(cfg.seed, "random-features"))
    elif recipe["kind"] == "vgg19bn":
        net = load_vgg19bn(cfg.loss.vgg_weights)
    else:
        net = SmallCNN(recipe["channels"], cfg.loss.feature_width, recipe["classes"])
        if "shipped" in recipe:
            load_shipped_public_net(recipe["shipped"], net)
        else:
            net.load_state_dict(cached_only("features", recipe["cache_spec"], PUBLIC_NET))
    return ready_feature_net(cfg, net, device)


def cached_only(name: str, spec: dict, what: str) -> dict:
    """A state this machine's cache holds for `spec`; a PrismError, never a rebuild, when it does not."""
    from prismfl.cache import cached_state_dict
    from prismfl.errors import PrismError

    def missing():
        raise PrismError(f"{what} is no longer in this machine's cache")

    return cached_state_dict(name, spec, missing, lambda *_: None)[0]


def ready_feature_net(cfg: RunConfig, net, device: str = "cpu"):
    """Frozen, on `device`, with the optional feature layers the config asks for (SmallCNN only)."""
    from prismfl.loss.features import SmallCNN, freeze

    if isinstance(net, SmallCNN):
        net.class_probs, net.pool = cfg.loss.class_term, cfg.loss.pool
    return freeze(net).to(device)
