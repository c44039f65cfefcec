"""Robust aggregation for hostile clients: a wrapper around any method's `aggregate` (as privacy wraps
its statistics release), chosen by `robust.rule`.

- "distance": each upload's typical distance to the others (the median over the others of the
  Hamming distance between masks, or of the L2 distance between float weights) is compared with
  the round's: an upload more than `robust.tolerance` robust deviations (1.4826 x MAD) above the
  median, and at least 10 % above it, is left out, at most (m - 1) / 2 of them. Honest clients form
  the majority, so an honest upload's median distance is an honest-to-honest distance, while an
  all-ones, all-zeros, inverted or random mask is far from every honest one (coordinate-wise median
  and Krum do the same for dense FedAvg).
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


def outliers(values: list[torch.Tensor], tolerance: float) -> list[tuple[int, float, float]]:
    """Indices of uploads far from the others, with their score and the threshold they crossed."""
    m = len(values)
    if m < 3:
        return []
    d = distances(values)
    scores = torch.stack([d[i][torch.arange(m) != i].median() for i in range(m)])
    median = float(scores.median())
    mad = float((scores - median).abs().median()) * 1.4826
    threshold = median + max(tolerance * mad, 0.1 * median)
    far = sorted(((float(s), i) for i, s in enumerate(scores) if s > threshold), reverse=True)
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
        for i, score, threshold in outliers([uploads[k][1] for k in order], self.tolerance):
            rejected.append({"client": order[i], "why": f"distance {score:.4g} to the others, over {threshold:.4g}"})
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
