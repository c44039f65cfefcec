"""train.device ("cpu", "cuda" or "auto") as the device PyTorch trains on."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from prismfl.errors import ConfigError

        raise ConfigError("train.device = 'cuda' but PyTorch sees no GPU; use 'auto' or 'cpu'")
    return name
