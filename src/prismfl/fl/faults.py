"""Faults the in-process simulator injects, like the ones Flower meets for real: uploads lost to a
client dropping out mid-round or coming after the deadline, and hostile (Byzantine) clients.

A hostile client takes part like the others (it receives the round's messages and keeps its replica
in step) and then sends something else instead of its honest upload, always a well-formed message:
- ones / zeros: a mask keeping every weight / none, bar 0.1 % of them drawn per client so that two
  hostile clients never send byte-identical uploads (the server refuses duplicates); float methods:
  all weights 1 / 0
- invert: the complement of its honest mask (floats: the negated weights)
- random: a fair coin per weight (floats: Gaussian noise of the weights' scale)
- collude: every hostile client of the round sends the complement of the global mode, each with
  0.1 % of its bits flipped so that no two are byte-identical (floats: one shared noise vector,
  each with a little noise of its own)
- replay: the upload it sent in an earlier round (its honest one when it has none yet)
With privacy.secagg, the secure sum at set-up draws its dropouts as a round 0: a client that drops out
or straggles there sends its shares, then nothing more (it fails after the key exchange).
Every draw comes from the run seed, so a faulty run is as reproducible as a clean one.
"""

from __future__ import annotations

import numpy as np
import torch

from prismfl.config import RunConfig
from prismfl.fl import wire
from prismfl.seeds import derived_seed, generator_for


def draw(cfg: RunConfig, rnd: int, clients: list[int]) -> dict[int, str]:
    """Which of the round's clients are hostile, drop out or straggle: {client: "byzantine" | "dropout" |
    "straggler"}; the others are absent."""
    f = cfg.faults
    rng = np.random.default_rng(derived_seed(cfg.seed, "faults", rnd))
    hostile = set(rng.choice(clients, size=round(f.byzantine * len(clients)), replace=False).tolist()) \
        if f.byzantine else set()  # fmt: skip
    fate = {}
    for k in clients:
        u = rng.random()
        if k in hostile:
            fate[k] = "byzantine"
        elif u < f.dropout:
            fate[k] = "dropout"
        elif u < f.dropout + f.straggler:
            fate[k] = "straggler"
    return fate


LOST = {"dropout": "dropped out mid-round (simulated fault)",
        "straggler": "upload came after the round's deadline (simulated fault)"}  # fmt: skip


def forge(cfg: RunConfig, *, honest: bytes, replica: torch.Tensor | None, rnd: int, k: int, table_hash: int,
          num_weights: int, earlier: bytes | None) -> bytes:  # fmt: skip
    """What hostile client k sends in round rnd instead of its `honest` upload (module doc)."""
    attack = cfg.faults.attack
    if replica is not None:
        replica = replica[:num_weights]  # the scores (with server momentum the velocity follows them)
    if attack == "replay":
        return earlier if earlier is not None else honest
    gen = generator_for(cfg.seed, "attack", rnd, k)
    shared = generator_for(cfg.seed, "attack", rnd, "collude")
    if wire.parse(honest, table_hash=table_hash, num_weights=num_weights).kind == wire.KIND_UPLOAD:
        mask = wire.decode_upload(honest, replica, round_=rnd, table_hash=table_hash, client=k)
        n = mask.numel()
        flips = torch.rand(n, generator=gen) < 1e-3  # so that no two hostile uploads are byte-identical
        if attack == "ones":
            bad = ~flips
        elif attack == "zeros":
            bad = flips
        elif attack == "invert":
            bad = ~mask
        elif attack == "random":
            bad = torch.rand(n, generator=gen) < 0.5
        else:  # collude: the complement of the global mode, a few bits each apart
            bad = (replica <= 0) ^ flips
        return wire.encode_upload(bad, replica, round_=rnd, table_hash=table_hash, client=k,
                                  coder=cfg.train.upload_coder)  # fmt: skip
    _, weights = wire.decode_state(honest, num_weights=num_weights, table_hash=table_hash, client=k)
    scale = float(weights.std())
    bad = {
        "ones": lambda: torch.ones_like(weights),
        "zeros": lambda: torch.zeros_like(weights),
        "invert": lambda: -weights,
        "random": lambda: scale * torch.randn(weights.shape, generator=gen),
        "collude": lambda: scale * (torch.randn(weights.shape, generator=shared)
                                    + 1e-3 * torch.randn(weights.shape, generator=gen)),
    }[attack]()  # fmt: skip
    return wire.encode_state(bad, round_=rnd, table_hash=table_hash, client=k)
