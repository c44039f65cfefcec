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
    weight_decay: float = 0.0,
    one_cycle: bool = False,
    shift: int = 0,
    mirror: bool = False,
    desc: str = "training classifier",
) -> nn.Module:
    """Adam (AdamW with weight decay) on cross-entropy with seeded shuffling, at a constant learning
    rate or on a one-cycle schedule peaking at `lr`; returns the net in eval mode. With `shift` or
    `mirror` every batch is augmented (`augment`) from the same seeded stream."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay) if weight_decay else \
        torch.optim.Adam(net.parameters(), lr=lr)  # fmt: skip
    net.train()
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps) if one_cycle else None
    with bar(total=steps, desc=desc, unit="step") as progress:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=gen)
            for start in range(0, len(images), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(net(augment(images[idx], gen, shift, mirror)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if schedule is not None:
                    schedule.step()
                progress.update()
    return net.eval()


def augment(images: torch.Tensor, gen: torch.Generator, shift: int, mirror: bool) -> torch.Tensor:
    """A batch mirrored left-right image by image with probability 1/2 (`mirror`), then moved as a
    whole by up to `shift` pixels each way (the edges replicated); neither: the batch as it is, and
    nothing drawn from `gen`."""
    if mirror:
        flip = torch.rand(len(images), generator=gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    if shift:
        h, w = images.shape[2:]
        padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
        images = padded[:, :, dy : dy + h, dx : dx + w]
    return images


@torch.no_grad()
def predict(net: nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Class probabilities, (N, classes)."""
    return torch.cat([net(images[i : i + batch]).softmax(1) for i in range(0, len(images), batch)])
