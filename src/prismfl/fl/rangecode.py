"""Range coding of the wire's payloads (constriction's queue coder) against models both sides hold:
Bernoulli bits, binomial counts, categorical symbols, and float32 values as four byte planes.

Plain functions from values to bytes and back: a decoder here trusts its input, so the wire format
(fl/wire.py) checks the sizes first, runs every decoder through `wire.coder_call` (a coder's panic is a
WireError) and refuses a payload that does not re-encode to the very bytes received.
"""

from __future__ import annotations

import numpy as np
import torch

PLANE_TABLE = 4 * 256 * 4  # a planes payload starts with 4 x 256 u32 counts


def probabilities(scores: torch.Tensor) -> np.ndarray:
    """sigmoid(scores) in float64, computed identically on both sides from the same float32 scores."""
    return torch.sigmoid(scores.detach().to("cpu", torch.float64)).numpy()


def words(payload: bytes) -> np.ndarray:
    """A payload as the coder's 32-bit words (its length a multiple of 4)."""
    return np.frombuffer(payload, dtype="<u4").astype(np.uint32)


def encode_bernoulli(bits: np.ndarray, p: np.ndarray) -> bytes:
    import constriction

    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(bits.astype(np.int32), constriction.stream.model.Bernoulli(perfect=False), p)
    return enc.get_compressed().tobytes()


def decode_bernoulli(payload: bytes, p: np.ndarray) -> np.ndarray:
    import constriction

    return np.asarray(constriction.stream.queue.RangeDecoder(words(payload)).decode(
        constriction.stream.model.Bernoulli(perfect=False), p))  # fmt: skip


def encode_binomial(counts: np.ndarray, m: int, p: np.ndarray) -> bytes:
    import constriction

    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(counts.astype(np.int32), constriction.stream.model.Binomial(), np.full(len(counts), m, np.int32), p)
    return enc.get_compressed().tobytes()


def decode_binomial(payload: bytes, m: int, p: np.ndarray) -> np.ndarray:
    """len(p) counts in 0..m, each coded against Binomial(m, p_i)."""
    import constriction

    return np.asarray(constriction.stream.queue.RangeDecoder(words(payload)).decode(
        constriction.stream.model.Binomial(), np.full(len(p), m, np.int32), p), dtype=np.int32)  # fmt: skip


def categorical(counts: np.ndarray):
    """constriction's categorical model of symbols 0..len(counts)-1 in proportion to `counts` (leaky: a
    symbol that never occurs still has a little probability)."""
    import constriction

    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def encode_planes(values: np.ndarray) -> bytes:
    """Float32 values -> their byte planes' histograms (4 x 256 u32) + the planes range-coded against them."""
    import constriction

    planes = values.astype("<f4").view(np.uint8).reshape(-1, 4)
    counts = np.stack([np.bincount(planes[:, j], minlength=256) for j in range(4)])
    enc = constriction.stream.queue.RangeEncoder()
    for j in range(4):
        enc.encode(planes[:, j].astype(np.int32), categorical(counts[j]))
    return counts.astype("<u4").tobytes() + enc.get_compressed().tobytes()


def decode_planes(payload: bytes, n: int) -> np.ndarray:
    """The n float32 values of encode_planes' bytes (histograms each summing to n, checked by the caller)."""
    import constriction

    counts = np.frombuffer(payload[:PLANE_TABLE], dtype="<u4").reshape(4, 256).astype(np.int64)
    dec, planes = constriction.stream.queue.RangeDecoder(words(payload[PLANE_TABLE:])), np.empty((n, 4), np.uint8)
    for j in range(4):
        planes[:, j] = dec.decode(categorical(counts[j]), n)
    return planes.reshape(-1).view("<f4")
