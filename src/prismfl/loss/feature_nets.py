"""The loss's feature network, from a RunConfig: seeded random weights, the user's VGG19-BN weights, or the
public feature net, trained on public images only (never client data) by a recipe, cached on this machine or
shipped with prismfl; and how another process rebuilds the same net from a recipe without loading any data.

`cfg` is the run's RunConfig throughout (prismfl.config sits above the loss layer: not imported here).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from prismfl.data.federation import Federation
from prismfl.data.sources import dataset_info, load_split, to_float
from prismfl.seeds import derived_seed
from prismfl.shipped import Shipped, load_shipped

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


def feature_training(cfg) -> dict:
    """train_classifier's arguments for the public feature net (loss.feature_training): "plain", 10
    epochs of Adam at 1e-3; "augmented", 30 epochs of one-cycle AdamW (peak 3e-3, weight decay 0.05) on
    batches shifted by up to 2 pixels and, where the dataset allows it, mirrored (the augmented recipe's
    net is the better loss; its test accuracy is in its cache record); loss.feature_epochs, when set, replaces the
    recipe's number of epochs."""
    recipe = cfg.loss.feature_training
    one_cycle = {"lr": 3e-3, "weight_decay": 0.05, "one_cycle": True}
    if recipe == "plain":
        args = {"epochs": PUBLIC_EPOCHS}
    else:
        data = cfg.data.dataset if cfg.loss.feature_data == "holdout" else cfg.loss.feature_data
        args = {"epochs": 30, **one_cycle, "shift": 2, "mirror": dataset_info(data).mirror}
    return {**args, "epochs": cfg.loss.feature_epochs or args["epochs"]}


def public_feature_data(cfg, fed: Federation) -> tuple[torch.Tensor, np.ndarray, str, str]:
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


def train_public_net(cfg, images: torch.Tensor, labels: np.ndarray, desc: str = "public feature net"):
    """The loss's public feature net trained on public images (never client data: public_feature_data)
    by the config's recipe (feature_training); not cached: build_feature_net caches it."""
    from prismfl.loss.features import seeded_cnn
    from prismfl.supervised import train_classifier

    # its initial weights from the run's seed (version 1 drew them from the process's unseeded generator)
    classes = int(labels.max()) + 1
    net = seeded_cnn(images.shape[1], cfg.loss.feature_width, classes, derived_seed(cfg.seed, "public-features"))
    return train_classifier(net, images, torch.from_numpy(labels.astype(np.int64)), seed=cfg.seed, desc=desc,
                            **feature_training(cfg))  # fmt: skip


def build_feature_net(cfg, fed: Federation, device: str = "cpu", log=print):
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


def feature_net_from_recipe(cfg, recipe: dict, device: str = "cpu"):
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


def ready_feature_net(cfg, net, device: str = "cpu"):
    """Frozen, on `device`, with the optional feature layers the config asks for (SmallCNN only)."""
    from prismfl.loss.features import SmallCNN, freeze

    if isinstance(net, SmallCNN):
        net.class_probs, net.pool = cfg.loss.class_term, cfg.loss.pool
    return freeze(net).to(device)
