"""Pictures: sample grids and training curves."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from prismfl.files import atomic_write_bytes


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (H', W', C) grid with `pad` pixels of background between tiles."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    pix = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = pix[i]
    return grid


def save_png(array: np.ndarray, path: Path, scale: int = 1) -> None:
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, scale: int = 2) -> None:
    save_png(image_grid(images, nrow), path, scale)


def save_array(images: torch.Tensor, path: Path, labels: torch.Tensor | None = None) -> None:
    """Samples as an array file: .npy (N, C, H, W) float32 in [-1, 1], or .npz with it under 'images'
    and, for a conditional model, the classes under 'labels' (int64)."""
    array = images.detach().cpu().float().numpy()
    buf = io.BytesIO()
    if Path(path).suffix.lower() == ".npz":
        extra = {} if labels is None else {"labels": labels.detach().cpu().long().numpy()}
        np.savez(buf, images=array, **extra)
    else:
        np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(Path(path), buf.getvalue())


PAPER_MB_PER_ROUND = 5.75  # what the paper reports per round (METHOD.md §6)
PAPER_WEIGHTS = 3_543_616  # its ResNet generator's maskable weights (one channel, 32x32)
PAPER_BITS_PER_WEIGHT = PAPER_MB_PER_ROUND * 8e6 / PAPER_WEIGHTS  # about 13 bits/weight


def _communication_panel(ax, records: list[dict]) -> None:
    """Upload bits per weight by round: as sent, the entropy bound, 1-bit packing, float32, the paper's figure."""
    rounds = [r["round"] for r in records]
    ax.plot(rounds, [r["bits_per_param"] for r in records], marker=".", label="sent (coded)")
    if any(r.get("entropy_bound_bits_per_param") for r in records):
        ax.plot(rounds, [r.get("entropy_bound_bits_per_param") or np.nan for r in records], ls="--",
                label="entropy bound")  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8, label="packed, 1 bit")
    ax.axhline(32.0, color="black", lw=0.8, label="dense float32")
    ax.axhline(PAPER_BITS_PER_WEIGHT, color="tab:red", lw=0.8, ls=":", label="paper's reported 5.75 MB")
    ax.set_yscale("log")
    ax.set_title("upload bits per weight", fontsize=9)
    ax.set_xlabel("round")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def curves(records: list[dict], path: Path) -> None:
    """Loss, MADA's lambda, mask entropy and seconds per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    panels = [
        ("loss", "matching loss (mean over clients)", True),
        ("lambda", "MADA lambda (Hamming distance)", False),
        ("mask_entropy", "entropy of global mask, bits/weight", False),
        ("seconds", "seconds per round", False),
    ]
    if any(r.get("domain_fid") is not None for r in records):
        panels.append(("domain_fid", "domain FID (1,000 samples)", False))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.2))
    _communication_panel(axes[-1], records)
    for ax, (key, title, log) in zip(axes, panels):
        ys = [r.get(key) for r in records]
        if any(y is not None for y in ys):
            ax.plot(rounds, [np.nan if y is None else y for y in ys], marker=".")
        if log and all(y and y > 0 for y in ys):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
