"""Supervised training of the small CNNs prismfl builds for itself (the loss's public feature net,
the evaluation classifier), with a progress bar."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prismfl.progress import bar


def train_classifier(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    desc: str = "training classifier",
) -> nn.Module:
    """Adam on cross-entropy with seeded shuffling; returns the net in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    with bar(total=steps, desc=desc, unit="step") as progress:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=gen)
            for start in range(0, len(images), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(net(images[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                progress.update()
    return net.eval()


@torch.no_grad()
def predict(net: nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Class probabilities, (N, classes)."""
    return torch.cat([net(images[i : i + batch]).softmax(1) for i in range(0, len(images), batch)])
