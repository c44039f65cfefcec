"""Client side of a PRISM round: global scores in, one sampled binary mask out.

Only the client touches its images, and only through `MeanVarMatching`, which holds its feature
statistics. What persists on a client across rounds (its Adam state and loss trackers) lives in
`ClientState`; everything random comes from the generator it is handed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prismfl.loss.matching import MeanVarMatching, TrackerState
from prismfl.model import masked


@dataclass
class LocalConfig:
    steps: int = 50
    batch_size: int = 64
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.999)


@dataclass
class ClientState:
    """What a client keeps between rounds."""

    optimizer: dict | None = None
    tracker: TrackerState = field(default_factory=TrackerState)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer, "tracker": self.tracker.state_dict()}

    @classmethod
    def from_state_dict(cls, state: dict, tracker_lr: float = 1e-5) -> ClientState:
        return cls(state["optimizer"], TrackerState.from_state_dict(state["tracker"], tracker_lr))


@dataclass
class LocalResult:
    mask: torch.Tensor | None  # bool, one entry per maskable weight (None for a dense model)
    loss: float  # mean matching loss over the local steps
    start_loss: float  # loss of the first step: the broadcast global model on this client's data
    scores: torch.Tensor  # the client's trained scores, or float weights of a dense model


def local_train(
    model: nn.Module,
    global_scores: torch.Tensor,
    loss_fn: MeanVarMatching,
    extract,
    state: ClientState,
    cfg: LocalConfig,
    generator: torch.Generator,
) -> LocalResult:
    """Start from the global scores, take `cfg.steps` Adam steps on the matching loss, sample a mask.

    For a dense model (the FedAvg baseline) the same loop trains float weights and returns them.
    """
    device = global_scores.device
    masked.set_trainable(model, global_scores)
    masked.set_fixed_mask(model, None)
    masked.configure(model, rng=generator)
    params = masked.trainable(model)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas)
    if state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    model.train()
    total, first = 0.0, None
    for _ in range(cfg.steps):
        z = torch.randn(cfg.batch_size, model.z_dim, generator=generator, device=device)
        surrogate, value = loss_fn(extract(model(z)), state.tracker)
        opt.zero_grad(set_to_none=True)
        surrogate.backward()
        opt.step()
        total += value
        first = value if first is None else first
    state.optimizer = opt.state_dict()
    scores = masked.get_trainable(model)
    if masked.is_dense(model):
        return LocalResult(mask=None, loss=total / cfg.steps, start_loss=first, scores=scores)
    mask = torch.rand(scores.shape, generator=generator, device=device) < torch.sigmoid(scores)
    return LocalResult(mask=mask, loss=total / cfg.steps, start_loss=first, scores=scores)
