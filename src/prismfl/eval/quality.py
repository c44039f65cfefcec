"""Quality of generated images as seen by the domain classifier: confidence and class coverage."""

from __future__ import annotations

import numpy as np
import torch

CONFIDENT = 0.9


def class_report(probs: torch.Tensor, num_classes: int) -> dict:
    """Share of samples classified with probability > 0.9, the class histogram, and coverage."""
    top, pred = probs.max(1)
    hist = np.bincount(pred.numpy(), minlength=num_classes)
    share = hist / max(1, len(pred))
    return {
        "confident_share": float((top > CONFIDENT).float().mean()),
        "class_histogram": hist.tolist(),
        "classes_covered": int((share >= 0.1 / num_classes).sum()),  # at least a tenth of a fair share
        "min_class_share": float(share.min()),
    }
