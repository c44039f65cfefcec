"""Network weights that ship with prismfl (src/prismfl/weights/, safetensors, each pinned by its sha256):
FashionMNIST's evaluation classifier (eval/classifier.py) and the demo's public feature net
(loss/feature_nets.py). Training either is seeded but not bit-reproducible across machines and thread counts,
so shipping them makes every machine score and train with the same nets, and saves the time to train
them. Loading never runs code (safetensors, not pickles) and fails with a one-line WeightsError.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from prismfl.errors import PrismError
from prismfl.files import MAX_NET_WEIGHTS_BYTES, read_capped

WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Shipped:
    """Weights that ship with prismfl: the file's name in WEIGHTS, its sha256, and for a classifier its
    test accuracy."""

    file: str
    sha256: str
    test_accuracy: float | None = None


class WeightsError(PrismError):
    """Weights shipped with prismfl are missing or damaged."""


def load_shipped(shipped: Shipped, net: nn.Module, what: str, where: Path = WEIGHTS) -> nn.Module:
    """Load shipped weights into `net` after checking their sha256; a WeightsError naming `what`, never
    a crash, if the file is missing, altered or does not fit the net."""
    from safetensors.torch import load

    path = where / shipped.file
    data = read_capped(path, MAX_NET_WEIGHTS_BYTES, what, WeightsError, f"{what} {path} is missing: reinstall prismfl")
    if hashlib.sha256(data).hexdigest() != shipped.sha256:
        raise WeightsError(f"{what} {path} fails its sha256 check: reinstall prismfl")
    try:
        net.load_state_dict(load(data))
    except Exception as exc:  # noqa: BLE001 - safetensors and a wrong shape raise several types
        raise WeightsError(f"{what} {path} does not fit its net: {exc}") from None
    return net
