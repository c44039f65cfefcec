"""Robust aggregation for hostile clients: a wrapper around any method's `aggregate` (as privacy wraps
its statistics release), chosen by `robust.rule`.

- "distance": each upload gets a distance, and one more than `robust.tolerance` robust deviations
  (1.4826 x MAD) above the round's median, and at least 10 % above it, is left out, at most
  (m - 1) / 2 of them. A PRISM mask's distance is to the global draw: the bits per weight it costs
  under the global probabilities (its cross-entropy). Honest masks are drawn near those probabilities,
  while a mask of ones or zeros, a coin per weight or an inverted mask costs a bit per weight or
  more. (The Hamming distance between masks does not separate them: two honest masks drawn from the
  same probabilities already differ in 2p(1 - p) of their bits, as much as an attack does; measured
  in docs/robustness.md.) Float weights (FedAvg) get their median L2 distance to the other uploads,
  in the spirit of Krum and the coordinate-wise median.
- "trimmed" (PRISM): per weight, the `robust.trim` share of the highest and of the lowest bits are
  trimmed from the counts (a coordinate-wise trimmed mean of the masks), and the broadcast carries
  the trimmed counts, so clients rebuild the same scores.
"""

from __future__ import annotations

import math

import torch

from prismfl.fl import aggregate
from prismfl.fl.methods.base import Outcome


def distances(values: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise distances: Hamming fraction for masks (bool), L2 for float vectors."""
    m = len(values)
    out = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m):
            a, b = values[i], values[j]
            d = (a != b).double().mean() if a.dtype == torch.bool else (a.double() - b.double()).norm()
            out[i, j] = out[j, i] = float(d)
    return out


def surprise(masks: list[torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
    """Bits per weight each mask costs under the global probabilities (its cross-entropy): an honest
    client's mask is drawn near them (about 0.5 to 0.8 bits per weight in the demo), while a mask of
    ones, of zeros, a coin per weight or an inverted mask costs a bit or more."""
    return torch.tensor([aggregate.cross_entropy_bits(m, scores) / m.numel() for m in masks], dtype=torch.float64)


def outliers(
    values: list[torch.Tensor], tolerance: float, scores: torch.Tensor | None = None
) -> list[tuple[int, float, float]]:
    """Indices of uploads far from the rest, with their score and the threshold they crossed.

    Masks with the global scores at hand are scored by `surprise`; anything else by its median
    distance to the other uploads (Hamming between masks, L2 between float weights)."""
    m = len(values)
    if m < 3:
        return []
    if scores is not None and values[0].dtype == torch.bool:
        score = surprise(values, scores)
    else:
        d = distances(values)
        score = torch.stack([d[i][torch.arange(m) != i].median() for i in range(m)])
    median = float(score.median())
    mad = float((score - median).abs().median()) * 1.4826
    threshold = median + max(tolerance * mad, 0.1 * median)
    far = sorted(((float(s), i) for i, s in enumerate(score) if s > threshold), reverse=True)
    return [(i, s, threshold) for s, i in far[: (m - 1) // 2]]


class Robust:
    """Wraps a method: its `aggregate` sees only the uploads the rule keeps (or trims the counts)."""

    def __init__(self, inner, rule: str, trim: float, tolerance: float):
        self.inner, self.rule, self.trim, self.tolerance = inner, rule, trim, tolerance

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def aggregate(self, state: dict, rnd: int, uploads: dict, sizes: list[int]) -> Outcome:
        if self.rule == "trimmed":
            return self.inner.aggregate(state, rnd, uploads, sizes, trim=math.floor(self.trim * len(uploads)))
        order = sorted(uploads)
        rejected = []
        scores = state.get("scores")
        for i, score, threshold in outliers([uploads[k][1] for k in order], self.tolerance, scores):
            what = "bits per weight under the global probabilities" if scores is not None else "distance to the others"
            rejected.append({"client": order[i], "why": f"{what}: {score:.4g}, over {threshold:.4g}"})
        out = {r["client"] for r in rejected}
        kept = {k: v for k, v in uploads.items() if k not in out}
        # what the left-out clients sent still counts: in the bytes, and in the coder's bound for masks
        sent = sum(len(uploads[k][0]) for k in out)
        bound = sum(aggregate.cross_entropy_bits(uploads[k][1], state["scores"]) for k in out
                    if uploads[k][1].dtype == torch.bool and "scores" in state)  # fmt: skip
        outcome = self.inner.aggregate(state, rnd, kept, sizes)
        outcome.upload_bytes += sent
        outcome.entropy_bound_bits += bound
        outcome.rejected = sorted(rejected, key=lambda r: r["client"]) + outcome.rejected
        return outcome
