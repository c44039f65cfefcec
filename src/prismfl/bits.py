"""Binary masks as packed bits: one bit per weight, little bit order (a model file's mask, and the
"packed" upload of the wire format). A neutral module, below both the model files and the federation."""

from __future__ import annotations

import numpy as np
import torch


def pack_mask(mask: torch.Tensor | np.ndarray) -> bytes:
    """Bool mask -> ceil(N/8) bytes, little bit order, trailing bits zero."""
    bits = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return np.packbits(bits.reshape(-1).astype(bool), bitorder="little").tobytes()


def unpack_mask(payload: bytes, n: int) -> torch.Tensor:
    """Inverse of pack_mask; rejects a payload of the wrong length or with stray trailing bits."""
    expected = (n + 7) // 8
    if len(payload) != expected:
        raise ValueError(f"packed mask of {n} bits needs {expected} bytes, got {len(payload)}")
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), bitorder="little")
    if bits[n:].any():
        raise ValueError("packed mask has non-zero padding bits")
    return torch.from_numpy(bits[:n].astype(bool))


def packed_size(n: int) -> int:
    return (n + 7) // 8
