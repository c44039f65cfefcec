"""Server side of a PRISM round: masks in, global scores out. Plain functions over tensors."""

from __future__ import annotations

import torch


def logit(theta: torch.Tensor) -> torch.Tensor:
    return torch.log(theta) - torch.log1p(-theta)


def aggregate_masks(masks: list[torch.Tensor], smoothing: float = 0.01) -> torch.Tensor:
    """Mean of the uploaded masks with each bit counted as `smoothing` / 1-`smoothing`, as logits.

    Smoothing keeps every probability inside [s, 1-s] so the logits stay finite and no weight
    is switched off (or on) for good by one round.
    """
    if not masks:
        raise ValueError("aggregate_masks needs at least one mask")
    total = torch.zeros(masks[0].shape, dtype=torch.float64)
    for m in masks:
        total += m.to(torch.float64)
    theta = smoothing + (1.0 - 2.0 * smoothing) * (total / len(masks))
    if smoothing == 0:
        theta = theta.clamp(1e-6, 1 - 1e-6)
    return logit(theta).to(torch.float32)


def sample_mask(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Bernoulli(sigmoid(scores)) draw as a bool tensor."""
    return torch.rand(scores.shape, generator=generator, device=scores.device) < torch.sigmoid(scores)


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two binary masks differ."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a != b).sum()) / a.numel()


def mada_update(
    global_scores: torch.Tensor, aggregate_scores: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, float]:
    """MADA: blend old and new logits by lambda, the Hamming distance of masks drawn from each.

    s_next = lambda * s_hat + (1 - lambda) * s_old (METHOD.md §4, logit space): when the new
    aggregate barely changes the sampled network, the global model barely moves.
    """
    old = sample_mask(global_scores, generator)
    new = sample_mask(aggregate_scores, generator)
    lam = hamming_distance(old, new)
    return lam * aggregate_scores + (1.0 - lam) * global_scores, lam
