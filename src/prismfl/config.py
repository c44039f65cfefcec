"""Typed run configuration: TOML in, validated dataclasses out (the rules they must meet: configcheck.py)."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prismfl import configcheck
from prismfl.configcheck import show_number
from prismfl.errors import ConfigError


@dataclass
class DataConfig:
    """The training images: which dataset, where its files are, at what size."""

    dataset: str = "fashion-mnist"  # the clients' dataset (its test split is what evaluate compares with)
    root: str = ""  # empty: look in the usual places (Debian package, ~/.cache/prismfl, ./data)
    resize: int = 0  # 0 keeps the native size; 32 for the paper's ResNet generator
    subset: int = 0  # use a seeded random subset of this many training images (0: all)


@dataclass
class PartitionConfig:
    """Who holds which images (seeded by the run seed; partition.txt of a run lists it)."""

    # "iid", "shards" (label-sorted shards: non-IID), "dirichlet" (class shares ~ Dir(alpha)), "attribute" (CelebA)
    scheme: str = "shards"
    num_clients: int = 10  # data holders (on Flower: one SuperNode each)
    shards_per_client: int = 2  # "shards": each client gets this many of the num_clients x shards label-sorted shards
    alpha: float = 0.5  # "dirichlet": the concentration; small is more skewed
    # training images held out of the clients' data as public, with loss.features = "public" on the hold-out
    # only (a privileged setting: read it beside --method public); otherwise no image is held out
    public_holdout: int = 5000


@dataclass
class ModelConfig:
    """The frozen random generator whose weights the clients mask (regenerated from the run seed)."""

    arch: str = "mlp"  # "mlp", "mlp-up" (the MLP at half size, upsampled), "dcgan", "resnet" (the paper's)
    z_dim: int = 64  # the noise vector's size
    width: int = 512  # the generator's width (hidden units or base channels)
    estimator: str = "plain"  # the masks' gradient: "plain" straight through (g), "scaled" (theta x g, the authors')
    conditional: bool = False  # a class label beside z; clients match per-class statistics (mlp, mlp-up)
    # conditional: each class split into this many modes, fitted on the public hold-out or, without one, from
    # the clients' moment sums (data/modes.py)
    modes: int = 1


@dataclass
class LossConfig:
    """The feature-matching loss each client minimises against the statistics of its own images."""

    # the feature net: "random" (a seeded random CNN, no data), "public" (a small CNN trained on public images:
    # loss.feature_data), "vgg19bn" (ImageNet weights from loss.vgg_weights, a file you have)
    features: str = "public"
    feature_width: int = 16  # the small CNN's base channels ("random" and "public")
    moment: str = "variance"  # match Var[f] (GFMN), or only the means ("mean")
    tracker: str = "ema"  # smooth the gaps over steps: "ema", "adam" (GFMN/the authors') or "none"
    tracker_beta: float = 0.9  # for "ema"
    tracker_lr: float = 1e-5  # for "adam" (the authors' value)
    vgg_weights: str = ""  # "vgg19bn": the path of the torchvision VGG19-BN weights file (nothing is downloaded)
    # what the public feature net (features = "public") learns from: "holdout", partition.public_holdout images
    # of the clients' own distribution (a privileged setting: compare with --method public), or a dataset of
    # another distribution that no client holds, all of its training split ("mnist" for FashionMNIST clients)
    feature_data: str = "holdout"
    # how the public feature net learns from the public images: "plain" (10 epochs of Adam, as before) or
    # "augmented" (30 epochs of one-cycle AdamW on mirrored, shifted images)
    feature_training: str = "plain"
    feature_epochs: int = 0  # the public feature net's epochs; 0: its recipe's own (10 or 30)
    class_term: bool = False  # also match the public net's class probabilities (holds the class shares)
    pool: int = 1  # average-pool every spatial feature map (and the pixels) by this factor before its statistics
    # conditional: each step's batch holds this many of a client's classes (or class modes) drawn at random,
    # their terms weighed up to keep the gradient unbiased (0: every class at every step)
    codes_per_step: int = 0


@dataclass
class TrainConfig:
    """Rounds, local training, the server's update and the messages."""

    method: str = "prism"  # prism, or a baseline: fedavg, local, central, public (fl/methods/)
    rounds: int = 20  # communication rounds
    local_steps: int = 50  # Adam steps a chosen client takes in a round
    batch_size: int = 64  # generated images per local step
    lr: float = 0.1  # the clients' Adam learning rate on the mask scores
    dense_lr: float = 1e-3  # Adam learning rate of the fedavg baseline's float weights
    # the clients' learning rate across rounds: "constant", or "cosine" from lr in round 1 down to
    # lr_floor x lr in the last round (fl.client.round_lr; the same for every method)
    lr_schedule: str = "constant"
    lr_floor: float = 0.1  # "cosine": the last round's lr as a share of lr
    client_fraction: float = 1.0  # the share of clients chosen each round (seeded by the round)
    mada: bool = True  # prism: blend rounds with MADA; false is the paper's PRISM-dagger
    smoothing: float = 0.01  # each uploaded bit counts as 0.01 / 0.99 when averaged
    upload_coder: str = "auto"  # "range" (vs global probabilities), "calibrated", "packed", or "auto": smallest
    # prism's downlink: "delta" (counts + lambda, from which a client that holds the previous global scores
    # rebuilds the new ones; the full float state to one that does not), "float32" (the full scores every
    # round, the paper's), or "quantized" (every round, the global probabilities drawn to
    # train.broadcast_levels levels by unbiased stochastic rounding, range-coded: fl/quantize.py)
    broadcast: str = "delta"
    broadcast_levels: int = 4  # the quantized broadcast's levels, evenly spaced in logit space
    server_momentum: float = 0.0  # prism: heavy-ball momentum of the server's logit update (FedAvgM); 0: off
    # (like mada, ignored by the baselines: a config serves --method fedavg as it is)
    # prism: the global scores of round 0 trained for this many steps on the public hold-out (the images the
    # public feature net learns from, which no client holds); 0: the paper's N(0, 1) scores from the seed.
    # Ignored by the baselines, as server_momentum is
    warm_start: int = 0
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    sample_every: int = 5  # write a sample grid every this many rounds (0: only at the end)
    eval_every: int = 0  # record a quick domain FID (1,000 samples) every this many rounds (0: never)


@dataclass
class PrivacyConfig:
    """Differential privacy of what the clients release (docs/privacy.md)."""

    epsilon: float = float("inf")  # inf: no privacy; otherwise record-level (epsilon, delta)-DP per client
    delta: float = 1e-5  # the delta of (epsilon, delta)-DP
    clip: float = 1.0  # per-layer clip bound = clip x median feature norm on non-private reference images
    # pooling (docs/privacy.md): the clients' releases, already DP, summed by the server and sent back
    pool: float = 0.0  # weight of the pooled statistics in each client's targets (0: its own release only)
    pool_classes: str = "own"  # conditional: "own" classes the client holds; "all": every class, pooled ones too
    # distributed noise (prismfl/secagg.py): each client adds 1/sqrt(M - colluders) of the noise and the
    # server learns only the sum of the clients' vectors, by secure aggregation; needs pool = 1
    secagg: bool = False
    colluders: int = 0  # clients assumed to collude with the server: the guarantee holds against them too
    # with secagg: the fraction of the K clients that may drop out of the secure sum (set-up to masked
    # vector) and the sum still be unmasked; each client's noise share is sized for the M = K - floor(dropouts K)
    # that must remain (0: every client must send its vector)
    dropouts: float = 0.0
    # with secagg: the fraction of the K clients that may drop out of the secure sum (set-up to masked
    # vector) and the sum still be unmasked; each client's noise share is sized for the M = K - floor(dropouts K)
    # that must remain (0: every client must send its vector)
    dropouts: float = 0.0
    shrink: bool = False  # James-Stein shrinkage of the released means and second moments (post-processing)
    # what shrink pulls toward: "layer" (each layer's average) or "public" (the public hold-out's own
    # clipped statistics, per class: public data, so still post-processing)
    shrink_to: str = "layer"
    # the share of epsilon's budget (of 1/z^2) the class modes' moment sums get where model.modes > 1 without
    # public images; the feature statistics get the rest (prismfl/accounting.py)
    split: float = 0.2


@dataclass
class FaultConfig:
    """Faults the in-process simulator injects (Flower has real ones): lost uploads and hostile clients."""

    dropout: float = 0.0  # probability that a chosen client drops out mid-round (trains, its upload is lost)
    straggler: float = 0.0  # probability that a chosen client's upload comes after the round's deadline
    byzantine: float = 0.0  # fraction of each round's clients that are hostile
    attack: str = "random"  # what hostile clients send: ones, zeros, invert, random, collude, replay


@dataclass
class RobustConfig:
    """Robust aggregation, wrapping any method (fl/robust.py)."""

    rule: str = "none"  # "none"; "distance": leave out uploads far from the others; "trimmed": trimmed counts
    trim: float = 0.2  # "trimmed": the share of uploads trimmed from each end, per weight (prism)
    tolerance: float = 3.0  # "distance": how many robust deviations above the typical distance count as outliers


@dataclass
class RunConfig:
    seed: int = 0  # every random draw of the run (generator weights, partition, masks) derives from it
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def public_images(self) -> int:
        """How many training images the run holds out as public (the public feature net's, which no client
        holds): partition.public_holdout with loss.features = "public" on loss.feature_data = "holdout",
        otherwise none."""
        in_distribution = self.loss.features == "public" and self.loss.feature_data == "holdout"
        return self.partition.public_holdout if in_distribution else 0

    def arch_spec(self):
        """The generator this configuration builds (model.generators.ArchSpec), not yet validated."""
        from prismfl.data.sources import dataset_info
        from prismfl.model.generators import ArchSpec

        info = dataset_info(self.data.dataset)
        classes = len(info.class_names) if self.model.conditional else 0
        return ArchSpec(self.model.arch, self.model.z_dim, self.model.width, info.channels,
                        self.data.resize or info.size, weight_seed=self.seed, num_classes=classes,
                        modes=self.model.modes if classes else 1)  # fmt: skip

    def validate(self) -> RunConfig:
        """This config, or a ConfigError in one line naming what to fix (configcheck: ranges, choices, the
        relations between keys, what the method supports)."""
        configcheck.validate(self)
        return self


# ---------------------------------------------------------------- building from TOML and --set


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, annotation)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**1000:  # float() would overflow; no key's range comes near
            raise ConfigError(f"{key} must be a finite number, got {show_number(value)}")
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
        raise ConfigError(f"{key} must be {kind.__name__}, got {type(value).__name__} {shown}")
    return value


def _build(cls, table: dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            extra = f"; did you mean '{prefix}{hint[0]}'?" if hint else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{full}'{extra}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' must be a table ([{full}]), got {value!r}")
            kwargs[key] = _build(annotation, value, f"{full}.")
        else:
            kwargs[key] = _check_type(full, value, annotation)
    return cls(**kwargs)


MAX_CONFIG_BYTES = 1 << 20  # a config file; prismfl's own are about 2 kB
MAX_OVERRIDE_CHARS = 1000  # one --set key=value
MAX_DEPTH = 16  # nested tables and arrays in a config (its own are 2 deep): deeper is refused, not recursed into


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.rounds=5' -> (['train', 'rounds'], 5); values are read as TOML, else as strings."""
    if len(item) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"--set {item[:40]!r}... is {len(item):,} characters, over prismfl's limit of "
                          f"{MAX_OVERRIDE_CHARS:,}")  # fmt: skip
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (for example train.rounds=5), got {item!r}")
    key, raw = (part.strip() for part in item.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {key}: the value is nested too deeply") from None
    _check_depth(value, f"--set {key}")
    return key.split("."), value


def _check_depth(value: Any, what: str) -> None:
    """Refuse tables and arrays nested more than MAX_DEPTH deep (no key takes one), iteratively."""
    level = [value]
    for _ in range(MAX_DEPTH + 1):
        level = [v for x in level if isinstance(x, dict | list) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return
    raise ConfigError(f"{what}: tables and arrays nested more than {MAX_DEPTH} deep")


def merge(table: dict[str, Any], path: list[str], value: Any) -> None:
    node = table
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a table")
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read a TOML file (or start from defaults or `base`), apply --set overrides, validate."""
    table: dict[str, Any] = dict(base or {})
    if path is not None:
        from prismfl.files import read_capped

        path = Path(path)
        data = read_capped(path, MAX_CONFIG_BYTES, "config file", ConfigError)
        try:
            table = tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        except (tomllib.TOMLDecodeError, RecursionError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {str(exc)[:200]}") from None
        _check_depth(table, f"config file {path}")
    for item in overrides:
        merge(table, *parse_override(item))
    return _build(RunConfig, without_retired(table)).validate()  # (a config of an older prismfl still loads)


def config_from_dict(table: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, table).validate()


# Keys measured and not adopted, then removed, each with the value whose behaviour stayed. A checkpoint or
# a config file written before they went may hold them; it loads when each holds that value.
RETIRED = {"loss.normalize": "layer", "loss.covariance": False, "loss.pca": 0, "loss.rff": 0,
           "train.upload_sampling": "independent", "train.warm_start_schedule": "constant",
           "train.final_mask": "mode"}  # fmt: skip


def without_retired(table: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config table without the RETIRED keys that hold the value whose behaviour stayed; a
    ConfigError naming a retired key set to anything else (this prismfl cannot run that any more)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in table.items()}
    for key, kept in RETIRED.items():
        section, name = key.split(".")
        node = out.get(section)
        if not isinstance(node, dict) or name not in node:
            continue
        value = node.pop(name)
        if value != kept or type(value) is not type(kept):
            raise ConfigError(f"{key} = {value!r} was retired (measured, not adopted): this prismfl only runs "
                              f"what {key} = {kept!r} did")  # fmt: skip
    return out
