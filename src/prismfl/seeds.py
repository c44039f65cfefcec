"""Every random stream of a run is named: a seed derived from the run's seed and the stream's keys, never shared."""

from __future__ import annotations

import hashlib

import torch


def derived_seed(*keys) -> int:
    """A 63-bit seed from any tuple of keys: every random stream of a run is named, not shared."""
    digest = hashlib.sha256(":".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator_for(*keys, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(*keys))
