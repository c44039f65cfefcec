"""The run configuration's rules: each numeric key's range, each string key's allowed values, and the
relations between keys, one small function per section (`validate`); then the rules that depend on the
method, against its record (capabilities.check). Every refusal is one ConfigError line that says what to
fix. Torch-free at import (the allowed values are read from their modules when a config is checked)."""

from __future__ import annotations

import dataclasses
import difflib
import math

from prismfl import capabilities
from prismfl.errors import ConfigError

FEATURE_TRAINING = ("plain", "augmented")  # loss.feature_training; the recipes: loss.feature_nets.feature_training
ATTACKS = ("ones", "zeros", "invert", "random", "collude", "replay")
ROBUST_RULES = ("none", "distance", "trimmed")

# Every numeric key's range, checked before anything else in validate: (low, high, brackets), the
# brackets as the message writes them, "[" and "]" including the bound, "(" and ")" excluding it. A NaN is in
# no range, and an infinity only in privacy.epsilon's (inf: no privacy). The upper bounds of sizes and counts
# are prismfl's limits; the other relations between keys are checked after, in validate.
MAX_EPSILON = 1000  # a finite privacy.epsilon above this guarantees nothing
RANGES: dict[str, tuple[float, float, str]] = {
    "seed": (0, 2**63, "[)"),
    "data.resize": (0, 32, "[]"),  # and 0 (native), 28 or 32
    "data.subset": (0, 10**8, "[]"),
    "partition.num_clients": (1, 65_535, "[]"),
    "partition.shards_per_client": (1, 10**6, "[]"),
    "partition.alpha": (1e-3, 1e6, "[]"),  # below 0.001 every class already goes to one client
    "partition.public_holdout": (0, 10**8, "[]"),
    "model.z_dim": (1, 4096, "[]"),  # model.generators.MAX_Z_DIM
    "model.width": (1, 4096, "[]"),  # MAX_WIDTH
    "model.modes": (1, 64, "[]"),  # MAX_MODES
    "loss.feature_width": (1, 1024, "[]"),
    "loss.tracker_beta": (0, 1, "[)"),
    "loss.tracker_lr": (0, 100, "(]"),
    "loss.feature_epochs": (0, 1000, "[]"),  # 0: the recipe's own
    "loss.pool": (1, 8, "[]"),
    "loss.codes_per_step": (0, 64_000, "[]"),  # 0: every class; at most classes x modes (1,000 x 64)
    "train.rounds": (1, 10**6, "[]"),
    "train.local_steps": (1, 10**7, "[]"),
    "train.broadcast_levels": (2, 256, "[]"),
    "train.batch_size": (1, 65_536, "[]"),
    "train.lr": (0, 100, "(]"),
    "train.dense_lr": (0, 100, "(]"),
    "train.lr_floor": (0, 1, "(]"),
    "train.client_fraction": (0, 1, "(]"),
    "train.smoothing": (0, 0.5, "[)"),
    "train.server_momentum": (0, 1, "[)"),
    "train.warm_start": (0, 10**7, "[]"),  # 0: no warm start
    "train.sample_every": (0, 10**6, "[]"),  # 0: only at the end
    "train.eval_every": (0, 10**6, "[]"),  # 0: never
    "privacy.epsilon": (0, math.inf, "(]"),  # inf: no privacy; finite values at most MAX_EPSILON
    "privacy.delta": (0, 1, "()"),
    "privacy.clip": (0, 1000, "(]"),  # x the median feature norm
    "privacy.split": (0, 1, "()"),  # the modes' share of the privacy budget
    "privacy.pool": (0, 1, "[]"),
    "privacy.colluders": (0, 65_534, "[]"),  # and fewer than partition.num_clients
    "privacy.dropouts": (0, 0.5, "[]"),  # (up to half: each client's noise variance grows as 1 / (1 - dropouts))
    "faults.dropout": (0, 1, "[)"),
    "faults.straggler": (0, 1, "[)"),
    "faults.byzantine": (0, 1, "[)"),
    "robust.trim": (0, 0.5, "[)"),
    "robust.tolerance": (0, 1000, "(]"),
}


def validate(cfg) -> None:
    """A ConfigError naming the first thing wrong with a RunConfig: the ranges, each section, the method."""
    for key, kind, value in numeric_values(cfg):
        check_range(key, kind, value, *RANGES[key])
    for section in (_data, _partition, _model, _loss, _train, _privacy, _faults, _robust):
        section(cfg)
    capabilities.check(cfg)


def _data(cfg) -> None:
    _one_of("data.dataset", cfg.data.dataset)
    if cfg.data.resize not in (0, 28, 32):
        raise ConfigError(f"data.resize must be 0 (native), 28 or 32, got {cfg.data.resize}")


def _partition(cfg) -> None:
    _one_of("partition.scheme", cfg.partition.scheme)


def _model(cfg) -> None:
    m = cfg.model
    _one_of("model.arch", m.arch)
    _one_of("model.estimator", m.estimator)
    if m.modes != 1 and not m.conditional:
        raise ConfigError("model.modes splits the classes of a class-conditional generator: set "
                          "model.conditional = true, or leave model.modes at 1")  # fmt: skip
    try:
        cfg.arch_spec().validate()
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


def _loss(cfg) -> None:
    loss = cfg.loss
    _one_of("loss.features", loss.features)
    _one_of("loss.feature_data", loss.feature_data)
    if loss.feature_data == cfg.data.dataset:
        raise ConfigError(f"loss.feature_data = {loss.feature_data!r} is the clients' own dataset: its public "
                          "images are partition.public_holdout's, set loss.feature_data = 'holdout'")  # fmt: skip
    if loss.feature_data != "holdout" and loss.features != "public":
        raise ConfigError("loss.feature_data names the public feature net's data: set loss.features = 'public'")
    _one_of("loss.moment", loss.moment)
    _one_of("loss.tracker", loss.tracker)
    _one_of("loss.feature_training", loss.feature_training)
    if loss.pool > 1 and loss.features not in ("public", "random"):
        raise ConfigError("loss.pool needs the public or random feature net")
    if loss.class_term and loss.features not in ("public", "random"):
        raise ConfigError("loss.class_term needs the public or random feature net")
    codes, per_step = cfg.arch_spec().codes, loss.codes_per_step
    if per_step and not (codes and 1 <= per_step <= codes):
        raise ConfigError("loss.codes_per_step draws classes for a class-conditional generator: an integer in "
                          f"1..{codes or 'classes'} (0: every class at every step), got {per_step}")  # fmt: skip
    if per_step and loss.tracker == "adam":
        raise ConfigError("loss.codes_per_step needs loss.tracker = 'ema' or 'none'")
    if loss.features == "vgg19bn" and not loss.vgg_weights:
        raise ConfigError(
            "loss.features = 'vgg19bn' needs loss.vgg_weights: the path of torchvision's vgg19_bn state_dict"
        )
    if loss.features == "public" and loss.feature_data == "holdout" and not cfg.public_images():
        raise ConfigError(
            "loss.features = 'public' trains on held-out public images: set partition.public_holdout > 0, "
            "or name a public dataset of another distribution (loss.feature_data = 'mnist'), or use "
            "loss.features = 'random'"
        )


def _train(cfg) -> None:
    t = cfg.train
    for key in ("device", "method", "upload_coder", "broadcast", "lr_schedule"):
        _one_of(f"train.{key}", getattr(t, key))
    codes, per_step = cfg.arch_spec().codes, cfg.loss.codes_per_step
    if codes and t.batch_size < 2 * (per_step or codes):
        modes = cfg.model.modes
        what = "model.conditional" + (f" with {modes} modes" if modes > 1 else "")
        raise ConfigError(
            f"{what} needs train.batch_size >= {2 * codes} (two generated images of every class"
            + (" mode" if modes > 1 else "") + " a client may hold), or loss.codes_per_step <= "
            f"{t.batch_size // 2} (that many drawn at random each step)"
            if not per_step else
            f"loss.codes_per_step = {per_step} needs train.batch_size >= {2 * per_step}"
        )  # fmt: skip


def _privacy(cfg) -> None:
    p = cfg.privacy
    _one_of("privacy.pool_classes", p.pool_classes)
    if p.pool > 0 and math.isinf(p.epsilon):
        raise ConfigError("privacy.pool shares the clients' statistics with the server: only private releases "
                          "may leave a client (set privacy.epsilon)")  # fmt: skip
    if p.pool_classes == "all" and not (p.pool > 0 and cfg.model.conditional):
        raise ConfigError("privacy.pool_classes = 'all' is for conditional models with privacy.pool > 0")
    if p.shrink and math.isinf(p.epsilon):
        raise ConfigError("privacy.shrink pulls noisy statistics toward their layer averages: set privacy.epsilon")
    _one_of("privacy.shrink_to", p.shrink_to)
    if p.shrink_to == "public" and not p.shrink:
        raise ConfigError("privacy.shrink_to says where privacy.shrink pulls the statistics: "
                          "set privacy.shrink = true")  # fmt: skip
    if p.shrink_to == "public" and not cfg.public_images():
        raise ConfigError("privacy.shrink_to = 'public' pulls toward the public hold-out's statistics: it needs "
                          "loss.features = 'public' and partition.public_holdout > 0")  # fmt: skip
    if (p.colluders or p.dropouts) and not p.secagg:
        raise ConfigError(f"privacy.{'colluders' if p.colluders else 'dropouts'} is for privacy.secagg = true")
    if p.secagg and (p.pool != 1 or (cfg.model.conditional and p.pool_classes != "all")):
        raise ConfigError("privacy.secagg: no client's own statistics are private on their own, so every client "
                          "trains against the secure sum alone: set privacy.pool = 1"
                          + (" and privacy.pool_classes = 'all'" if cfg.model.conditional else ""))  # fmt: skip
    if not 0 <= p.colluders < cfg.partition.num_clients:
        raise ConfigError(f"privacy.colluders must be in [0, {cfg.partition.num_clients - 1}], got {p.colluders}")
    if p.secagg:
        from prismfl.secagg import min_survivors

        left = min_survivors(cfg.partition.num_clients, p.dropouts)
        if p.colluders >= left:
            raise ConfigError(f"privacy.dropouts = {p.dropouts:g} leaves M = {left} of the "
                              f"{cfg.partition.num_clients} clients, not more than privacy.colluders = "
                              f"{p.colluders}: each client's noise share, "
                              "sigma / sqrt(M - colluders), needs M > colluders")  # fmt: skip
    if not math.isinf(p.epsilon) and p.epsilon > MAX_EPSILON:
        raise ConfigError(f"privacy.epsilon must be at most {MAX_EPSILON:,} (or inf: no privacy), got "
                          f"{show_number(p.epsilon)}")  # fmt: skip
    if not math.isinf(p.epsilon):
        from prismfl.privacy import noise_multiplier

        noise_multiplier(p.epsilon, p.delta)  # a request the accountant cannot meet fails here


def _faults(cfg) -> None:
    _one_of("faults.attack", cfg.faults.attack)


def _robust(cfg) -> None:
    _one_of("robust.rule", cfg.robust.rule)


def choices() -> dict[str, tuple[str, ...]]:
    """Every string key's allowed values: what validate checks, and what docs/config.md lists."""
    from prismfl.data.partition import SCHEMES
    from prismfl.data.sources import DATASETS
    from prismfl.loss.features import FEATURE_NETS
    from prismfl.loss.matching import MOMENTS
    from prismfl.loss.trackers import TRACKERS
    from prismfl.model.generators import ARCHITECTURES
    from prismfl.model.masked import ESTIMATORS

    return {
        "data.dataset": tuple(DATASETS),
        "partition.scheme": SCHEMES,
        "model.arch": ARCHITECTURES,
        "model.estimator": ESTIMATORS,
        "loss.features": FEATURE_NETS,
        "loss.feature_data": ("holdout", *DATASETS),
        "loss.moment": MOMENTS,
        "loss.tracker": TRACKERS,
        "loss.feature_training": FEATURE_TRAINING,
        "train.device": ("cpu", "cuda", "auto"),
        "train.method": tuple(capabilities.METHODS),
        "train.upload_coder": ("auto", "range", "calibrated", "packed"),
        "train.broadcast": ("delta", "float32", "quantized"),
        "train.lr_schedule": ("constant", "cosine"),
        "faults.attack": ATTACKS,
        "robust.rule": ROBUST_RULES,
        "privacy.pool_classes": ("own", "all"),
        "privacy.shrink_to": ("layer", "public"),
    }


RENAMED = {"train.method": capabilities.RENAMED}  # values of an older prismfl: what to write instead


def _one_of(key: str, value: str) -> None:
    if value in RENAMED.get(key, {}):
        raise ConfigError(f"{key} = {value!r} is now {RENAMED[key][value]}")
    allowed = choices()[key]
    if value not in allowed:
        hint = difflib.get_close_matches(value, allowed, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(allowed)}{extra}")


def numeric_values(node, prefix: str = ""):
    """(key, "int" or "float", value) of every numeric key of a config (a bool is not one), nested keys dotted."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from numeric_values(value, f"{prefix}{f.name}.")
        elif f.type in ("int", "float"):
            yield f"{prefix}{f.name}", f.type, value


def check_range(key: str, kind: str, value: float, low: float, high: float, brackets: str) -> None:
    """A ConfigError naming `key` unless `value` lies in the range (a NaN lies in none); see RANGES."""
    above = value > low if brackets[0] == "(" else value >= low
    below = value < high if brackets[1] == ")" else value <= high
    if not (above and below):
        what = "an integer" if kind == "int" else "a number" if math.isinf(high) else "a finite number"
        bounds = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in (low, high))
        raise ConfigError(f"{key} must be {what} in {brackets[0]}{bounds}{brackets[1]}, got {show_number(value)}")


def show_number(value: float) -> str:
    """A value for a one-line message: as written, a huge integer by its length."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"a number of {len(str(abs(value))):,} digits"
    return repr(value)
