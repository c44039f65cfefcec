"""`prismfl` with PRISM's server step replaced, for a screen of issue 12's server-update lever
(docs/quality.md, "PRISM's server step on the grid"); not a feature.

The core's step (fl/aggregate.py) moves the global logits by heavy ball: v = beta v + (s_hat - s),
s' = s + lambda v, where s_hat is the logit of the smoothed mean mask, so a weight that all K clients
keep jumps to logit(1 - smoothing) = 4.6 in the proposal. Two replacements:

- `--step probability`: the same heavy-ball step on the probabilities, p' = clamp(p + lambda v, s, 1 - s)
  with v = beta v + (theta_hat - p); with beta = 0, MADA's blend of probabilities. Both sides (the server
  and the simulated clients, which rebuild the state with the same functions) are patched, so they stay
  bit for bit in step.
- `--step adam`: FedAdam on the logits with MADA's lambda in the step size: m = beta m + (1 - beta) g,
  u = beta2 u + (1 - beta2) g^2, s' = clamp(s + eta lambda m_hat / (sqrt(u_hat) + tau)), hats bias-corrected,
  g = s_hat - s (beta is `train.server_momentum`). The second moment u lives only in the server, so the
  run must send the clients the full float32 state every round (`--set train.broadcast=float32`): they
  never rebuild it.

The patch holds in this process only and the run's files do not record it.

Run (the arguments after `--` are prismfl's own):
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/server_step.py --step probability -- grid \\
      --config configs/grid-cpu.toml --datasets fashion-mnist --partitions shards --methods prism --seeds 0 \\
      --samples 5000 --out DIR
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/server_step.py --step adam --eta 8 --tau 1 -- grid \\
      ... --set train.broadcast=float32 --out DIR
"""

from __future__ import annotations

import argparse
import sys

import torch

from prismfl.fl import aggregate


def probability_momentum_step(global_scores, proposal, velocity, beta, step, smoothing):
    """aggregate.momentum_step with the pseudo-gradient and the step in probability space."""
    floor = aggregate.probability_floor(smoothing)
    p_old, p_hat = torch.sigmoid(global_scores.double()), torch.sigmoid(proposal.double())
    velocity = beta * velocity + (p_hat - p_old).to(velocity.dtype)
    p_new = (p_old + step * velocity.double()).clamp(floor, 1 - floor)
    return torch.logit(p_new).to(global_scores.dtype), velocity


def probability_blend(global_scores, proposal, lam):
    """aggregate.blend of probabilities: p' = lambda theta_hat + (1 - lambda) p."""
    if lam is None:
        return proposal
    p_new = lam * torch.sigmoid(proposal.double()) + (1 - lam) * torch.sigmoid(global_scores.double())
    return torch.logit(p_new).to(global_scores.dtype)


class ServerAdam:
    """FedAdam on the global logits, in aggregate.momentum_step's signature: the first moment is the
    state's velocity, the second moment and the round count are held here (one server per process)."""

    def __init__(self, eta: float, tau: float, beta2: float = 0.99):
        self.eta, self.tau, self.beta2 = eta, tau, beta2
        self.second, self.t = None, 0

    def __call__(self, global_scores, proposal, first, beta, step, smoothing):
        g = proposal - global_scores
        first = beta * first + (1 - beta) * g
        self.second = (1 - self.beta2) * g * g + (0 if self.second is None else self.beta2 * self.second)
        self.t += 1
        m_hat, u_hat = first / (1 - beta**self.t), self.second / (1 - self.beta2**self.t)
        bound = aggregate.logit_bound(smoothing)
        new = global_scores + self.eta * step * m_hat / (u_hat.sqrt() + self.tau)
        return new.clamp(-bound, bound), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step", choices=["probability", "adam"], required=True)
    p.add_argument("--eta", type=float, default=8.0, help="adam: the step is eta x MADA's lambda")
    p.add_argument("--tau", type=float, default=1.0, help="adam: added to sqrt(u_hat)")
    p.add_argument("--beta2", type=float, default=0.99, help="adam: the second moment's decay")
    p.add_argument("prismfl", nargs=argparse.REMAINDER, help="-- then prismfl's arguments")
    args = p.parse_args()
    rest = args.prismfl[1:] if args.prismfl[:1] == ["--"] else args.prismfl
    if args.step == "adam":
        if "train.broadcast=float32" not in rest:
            p.error("--step adam needs --set train.broadcast=float32 (the clients cannot rebuild its state)")
        aggregate.momentum_step = ServerAdam(args.eta, args.tau, args.beta2)
    else:
        aggregate.momentum_step, aggregate.blend = probability_momentum_step, probability_blend
    from prismfl.cli import main as prismfl_main

    sys.argv = ["prismfl", *rest]
    prismfl_main()


if __name__ == "__main__":
    main()
