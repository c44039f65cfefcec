"""What each federated method (train.method) supports, as plain data, and the config rules that depend on it.

A method's record says which options it runs with (a class-conditional generator, secure aggregation,
robust rules, a warm start, ...) and where it writes its model. `check` refuses a config that asks a
method for what its record does not list, in one line; it runs wherever a config is validated
(configcheck.validate). The methods themselves (fl/methods/) each point at their record (`Method.caps`),
and evaluation reads from it where a run's model is. Torch-free and importing nothing of prismfl but
its errors: loading a config imports it.

A new method: write it in fl/methods/, add its record here and its class to fl/methods/registry.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prismfl.errors import ConfigError

MASK_MODEL = "model.prism"  # the run's mask model (modelfile.save), in the run directory
DENSE_MODEL = "model.pt"  # a dense model's float weights (modelfile.save_dense)
CLIENT_MODELS = "models/client-{k}.prism"  # one mask model per client k


@dataclass(frozen=True)
class Capabilities:
    """What one method supports; each option a method does not list is refused with its name."""

    name: str  # its train.method
    model: str  # where in the run directory it writes its model ("{k}" in it: one per client k)
    communicates: bool = True  # its clients' uploads travel and the server aggregates them
    robust_rules: tuple[str, ...] = ()  # the robust.rule values besides "none" that can wrap it
    conditional: bool = False  # model.conditional (a class label beside z)
    secagg: bool = False  # privacy.secagg (the server learns only the sum of the clients' releases)
    public_only: bool = False  # it trains on the public hold-out alone and reads no client's images
    warm_start: bool = False  # train.warm_start applies (the others ignore it)
    mada: bool = False  # train.mada applies: each round's record holds MADA's lambda
    # train.broadcast = "delta": the most uploads a round's broadcast delta aggregates (fl/wire.py
    # MAX_DELTA_M); 0: the method sends no broadcast delta
    delta_uploads: int = 0

    def per_client(self) -> bool:
        """Whether it writes one model per client (`model` with "{k}")."""
        return "{k}" in self.model


METHODS: dict[str, Capabilities] = {
    c.name: c
    for c in (
        Capabilities("prism", MASK_MODEL, robust_rules=("distance", "trimmed"), conditional=True, secagg=True,
                     warm_start=True, mada=True, delta_uploads=256),
        Capabilities("fedavg", DENSE_MODEL, robust_rules=("distance",)),
        Capabilities("local", CLIENT_MODELS, communicates=False, conditional=True),
        Capabilities("central", MASK_MODEL, communicates=False, conditional=True),
        Capabilities("public", MASK_MODEL, communicates=False, conditional=True, public_only=True),
    )
}  # fmt: skip

RENAMED = {"prism-nomada": "train.method = 'prism' with train.mada = false"}  # old names: what to write instead

ROBUST_WHAT = {"distance": "leaves out uploads far from the others", "trimmed": "trims mask counts"}


def supporting(flag) -> list[str]:
    """The names of the methods whose record satisfies `flag` (a predicate on a record), in METHODS' order."""
    return [name for name, c in METHODS.items() if flag(c)]


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check(cfg) -> None:
    """A ConfigError in one line where the config (a RunConfig whose sections passed their own checks) asks
    its method for an option the method's record does not list."""
    m = METHODS[cfg.train.method]
    name, t, p = m.name, cfg.train, cfg.privacy
    per_round = max(1, round(t.client_fraction * cfg.partition.num_clients))
    if m.delta_uploads and t.broadcast == "delta" and per_round > m.delta_uploads:
        raise ConfigError(f"{per_round} clients a round: a {name.upper()} round aggregates at most {m.delta_uploads} "
                          "uploads (what its broadcast delta holds, fl/wire.py MAX_DELTA_M); lower "
                          "train.client_fraction, or set train.broadcast = 'quantized'")  # fmt: skip
    rule = cfg.robust.rule
    if rule != "none" and not m.communicates:
        raise ConfigError(f"robust.rule needs a method whose clients' uploads are aggregated, not {name!r}")
    if rule != "none" and rule not in m.robust_rules:
        methods = " or ".join(repr(n) for n in supporting(lambda c: rule in c.robust_rules))
        raise ConfigError(f"robust.rule = {rule!r} {ROBUST_WHAT[rule]}: it needs train.method = {methods}")
    if cfg.model.conditional and not m.conditional:
        raise ConfigError(f"model.conditional is implemented for the {_listed(supporting(lambda c: c.conditional))} "
                          f"methods, not {name!r}")  # fmt: skip
    if m.public_only and not cfg.public_images():
        raise ConfigError(f"train.method = {name!r} trains on the public hold-out, which exists with "
                          "loss.features = 'public' and partition.public_holdout > 0")  # fmt: skip
    if m.public_only and not math.isinf(p.epsilon):
        raise ConfigError(f"train.method = {name!r} reads no client's data, so there is nothing to make private: "
                          "leave privacy.epsilon unset")  # fmt: skip
    if t.warm_start and m.warm_start and not cfg.public_images() and p.secagg:
        raise ConfigError("train.warm_start without public images trains on the clients' pooled statistics, "
                          "which privacy.secagg hides from everyone until the rounds start: set "
                          "train.warm_start = 0 or give a public hold-out")  # fmt: skip
    if p.secagg and not m.secagg:
        names = supporting(lambda c: c.secagg)
        raise ConfigError(f"privacy.secagg is implemented for the {_listed(names)} method{'s' * (len(names) > 1)}, "
                          f"not {name!r}")  # fmt: skip
