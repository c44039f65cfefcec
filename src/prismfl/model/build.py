"""The generator a run trains, from its RunConfig, and PRISM's global scores of round 0."""

from __future__ import annotations

import torch

from prismfl.model import masked
from prismfl.model.generators import build_generator
from prismfl.seeds import generator_for


def build_model(cfg, device: str = "cpu") -> torch.nn.Module:
    """The generator of `cfg` (a RunConfig: model.* and data.*), its masked layers set to model.estimator."""
    model = build_generator(cfg.arch_spec()).to(device)
    masked.configure(model, estimator=cfg.model.estimator)
    return model


def initial_scores(cfg, n: int) -> torch.Tensor:
    """Global scores of round 0: N(0, 1) from the run seed (METHOD.md §2)."""
    return torch.randn(n, generator=generator_for(cfg.seed, "initial-scores"))
