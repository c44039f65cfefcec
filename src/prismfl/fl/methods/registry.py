"""The methods prismfl runs, by name (train.method), and the wrappers around them (privacy, robust
aggregation). What each supports is its record in prismfl/capabilities.py (`Method.caps`), against which
every config is checked when it is validated (capabilities.check); a method is registered here by its class."""

from __future__ import annotations

import math

from prismfl import capabilities
from prismfl.config import RunConfig
from prismfl.fl.methods.base import Method
from prismfl.fl.methods.central import Central, PublicOnly
from prismfl.fl.methods.fedavg import FedAvg
from prismfl.fl.methods.local import Local
from prismfl.fl.methods.prism import Prism

REGISTRY: dict[str, type[Method]] = {cls.caps.name: cls for cls in (Prism, FedAvg, Local, Central, PublicOnly)}


def build(cfg: RunConfig) -> Method:
    """The method of a config, wrapped in the private statistics release when privacy.epsilon is finite (a
    ConfigError where the config asks the method for what its record does not list)."""
    capabilities.check(cfg)
    method = REGISTRY[cfg.train.method](cfg)
    if not math.isinf(cfg.privacy.epsilon):
        from prismfl.privacy import Private

        method = Private(method)
    if cfg.robust.rule != "none":
        from prismfl.fl.robust import Robust

        method = Robust(method, cfg.robust.rule, cfg.robust.trim, cfg.robust.tolerance)
    return method
