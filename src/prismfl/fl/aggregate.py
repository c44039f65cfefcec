"""What a PRISM round computes from masks: run by the server, and by clients that rebuild the global
scores from a broadcast delta. Plain functions over CPU tensors.

A round is: count how many uploads kept each weight (`count_masks`), turn the counts into
smoothed logits (`aggregate_scores`), measure MADA's lambda (`mada_lambda`, the only random step,
done by the server alone), and blend (`apply_round`), or, with a server optimiser, take a momentum
step (`momentum_step`). Clients that receive the counts and lambda call the same function and hold
the same global scores, bit for bit.
"""

from __future__ import annotations

import math

import torch

PROB_FLOOR = 1e-6  # without smoothing, a probability stays in [PROB_FLOOR, 1 - PROB_FLOOR]: finite logits


def logit(theta: torch.Tensor) -> torch.Tensor:
    return torch.log(theta) - torch.log1p(-theta)


def count_masks(masks: list[torch.Tensor]) -> torch.Tensor:
    """How many of the uploaded masks keep each weight (int32)."""
    if not masks:
        raise ValueError("a round needs at least one uploaded mask")
    total = torch.zeros(masks[0].shape, dtype=torch.int32)
    for m in masks:
        if m.shape != total.shape:
            raise ValueError(f"mask of shape {tuple(m.shape)} does not match {tuple(total.shape)}")
        total += m.to(torch.int32)
    return total


def trim_counts(counts: torch.Tensor, m: int, trim: int) -> tuple[torch.Tensor, int]:
    """Coordinate-wise trimmed counts: of the m sorted bits of a weight, drop the `trim` highest and the
    `trim` lowest; (counts over the m - 2 trim that remain, m - 2 trim)."""
    if not 0 <= 2 * trim < m:
        raise ValueError(f"cannot trim {trim} from each end of {m} uploads")
    return (counts - trim).clamp(0, m - 2 * trim).to(torch.int32), m - 2 * trim


def aggregate_scores(counts: torch.Tensor, m: int, smoothing: float = 0.01) -> torch.Tensor:
    """Logits of the mean mask, each bit counted as `smoothing` / 1-`smoothing` (METHOD.md §4).

    Smoothing keeps every probability inside [s, 1-s], so logits stay finite and one round can
    never switch a weight off (or on) for good.
    """
    theta = smoothing + (1.0 - 2.0 * smoothing) * (counts.to(torch.float64) / m)
    if smoothing == 0:
        theta = theta.clamp(PROB_FLOOR, 1 - PROB_FLOOR)
    return logit(theta).to(torch.float32)


def sample_mask(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Bernoulli(sigmoid(scores)) draw as a bool tensor."""
    return torch.rand(scores.shape, generator=generator, device=scores.device) < torch.sigmoid(scores)


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two binary masks differ (each weight counted once)."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a != b).sum()) / a.numel()


def mada_lambda(global_scores: torch.Tensor, aggregate: torch.Tensor, generator: torch.Generator) -> float:
    """MADA's lambda: the Hamming distance between masks drawn from the old and the new global state."""
    return hamming_distance(sample_mask(global_scores, generator), sample_mask(aggregate, generator))


def blend(global_scores: torch.Tensor, aggregate: torch.Tensor, lam: float | None) -> torch.Tensor:
    """s_next = lambda * s_hat + (1 - lambda) * s_old (logit space); no MADA (lambda None): s_hat."""
    if lam is None:
        return aggregate
    return lam * aggregate + (1.0 - lam) * global_scores


def probability_floor(smoothing: float) -> float:
    """The least probability a global state holds: the smoothing, or PROB_FLOOR without it."""
    return smoothing if smoothing > 0 else PROB_FLOOR


def logit_bound(smoothing: float) -> float:
    """The largest |logit| a global score holds: logit(1 - probability_floor(smoothing))."""
    floor = probability_floor(smoothing)
    return math.log((1.0 - floor) / floor)


def momentum_step(global_scores: torch.Tensor, aggregate: torch.Tensor, velocity: torch.Tensor, beta: float,
                  step: float, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A server optimiser on the global scores (FedAvgM, heavy ball, in logit space): the round's
    pseudo-gradient g = s_hat - s_old feeds v <- beta v + g, and s_next = s_old + step v, clamped to the
    logits the smoothing allows (so one round still cannot switch a weight off for good). `step` is
    MADA's lambda (1 without MADA); beta = 0 is the plain blend up to float rounding.
    Returns (s_next, v)."""
    velocity = beta * velocity + (aggregate - global_scores)
    bound = logit_bound(smoothing)
    return (global_scores + step * velocity).clamp(-bound, bound), velocity


def apply_round(
    global_scores: torch.Tensor, counts: torch.Tensor, m: int, lam: float | None, smoothing: float
) -> torch.Tensor:
    """The new global scores from the round's counts and lambda: run by the server and by clients."""
    return blend(global_scores, aggregate_scores(counts, m, smoothing), lam)


def binary_entropy_bits(scores: torch.Tensor) -> float:
    """Mean entropy (bits/weight) of Bernoulli(sigmoid(scores)): the floor for coding a sampled mask."""
    p = torch.sigmoid(scores.double()).clamp(1e-12, 1 - 1e-12)
    return float((-(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))).mean())


def cross_entropy_bits(mask: torch.Tensor, scores: torch.Tensor) -> float:
    """-log2 of the probability of `mask` under Bernoulli(sigmoid(scores)): a coder's lower bound."""
    log_p = torch.nn.functional.logsigmoid(scores.double())  # log P(keep)
    log_q = torch.nn.functional.logsigmoid(-scores.double())  # log P(drop)
    return float(-torch.where(mask.cpu(), log_p.cpu(), log_q.cpu()).sum() / math.log(2))
