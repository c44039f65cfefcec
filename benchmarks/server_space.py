"""`prismfl` with PRISM's server step taken in probability space instead of logit space: a screen of
issue 12's server-update lever (docs/quality.md, "PRISM's server step on the grid"), not a feature.

The core's step (fl/aggregate.py) moves the global logits: s' = s + lambda v, v = beta v + (s_hat - s),
where s_hat = logit of the smoothed mean mask, so a weight that all K clients keep jumps to
logit(1 - smoothing) = 4.6 in the proposal. Here the same heavy-ball step moves the probabilities:
p' = clamp(p + lambda v, s, 1 - s), v = beta v + (theta_hat - p); with beta = 0, MADA's blend of
probabilities. The two functions are patched in this process only, so the server and the simulated
clients (which rebuild the state with the same functions) stay bit for bit in step; the run's files do
not record the patch.

Run (the arguments are prismfl's own):
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/server_space.py grid --config configs/grid-cpu.toml \
      --datasets fashion-mnist --partitions shards --methods prism --seeds 0 --samples 5000 --out DIR
"""

from __future__ import annotations

import sys

import torch

from prismfl.fl import aggregate


def momentum_step(global_scores, proposal, velocity, beta, step, smoothing):
    """aggregate.momentum_step with the pseudo-gradient and the step in probability space."""
    floor = smoothing if smoothing > 0 else aggregate.PROB_FLOOR
    p_old, p_hat = torch.sigmoid(global_scores.double()), torch.sigmoid(proposal.double())
    velocity = beta * velocity + (p_hat - p_old).to(velocity.dtype)
    p_new = (p_old + step * velocity.double()).clamp(floor, 1 - floor)
    return torch.logit(p_new).to(global_scores.dtype), velocity


def blend(global_scores, proposal, lam):
    """aggregate.blend of probabilities: p' = lambda theta_hat + (1 - lambda) p."""
    if lam is None:
        return proposal
    p_new = lam * torch.sigmoid(proposal.double()) + (1 - lam) * torch.sigmoid(global_scores.double())
    return torch.logit(p_new).to(global_scores.dtype)


if __name__ == "__main__":
    aggregate.momentum_step, aggregate.blend = momentum_step, blend
    from prismfl.cli import main

    sys.argv = ["prismfl", *sys.argv[1:]]
    main()
