"""A cache for networks prismfl trains itself (public feature nets, evaluation classifiers).

Each entry is `<name>-<key>.pt` plus `<name>-<key>.json` with the sha256 of the weights file and
what the network was trained on; a file whose checksum does not match is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from prismfl.files import atomic_write_bytes


def cache_dir() -> Path:
    return Path(os.environ.get("PRISMFL_CACHE", Path.home() / ".cache" / "prismfl")).expanduser()


def cache_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cached_state_dict(
    name: str, spec: dict, build: Callable[[], tuple[dict, dict]], log: Callable[[str], None] = print
) -> tuple[dict, dict]:
    """Return (state_dict, metadata) for `spec`, training with `build()` on a miss or a bad checksum.

    `build` returns (state_dict, metadata); metadata says what the net saw (recorded, checked by callers).
    """
    key = cache_key(spec)
    weights = cache_dir() / f"{name}-{key}.pt"
    meta_path = weights.with_suffix(".json")
    if weights.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        data = weights.read_bytes()
        if hashlib.sha256(data).hexdigest() == meta.get("sha256"):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), meta
        log(f"cache: {weights} fails its checksum; rebuilding")
    state, meta = build()
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    meta = {**meta, "spec": spec, "sha256": hashlib.sha256(data).hexdigest(), "file": weights.name}
    atomic_write_bytes(weights, data)
    atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    return state, meta
