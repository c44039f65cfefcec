"""The quantized broadcast (`train.broadcast = "quantized"`): the global probabilities in a few levels.

The server keeps its state in full precision. Each round it draws one quantization of the global
probabilities p = sigmoid(scores), the same for every client of the round: L levels evenly spaced in
logit space over the scores the smoothing allows (`aggregate.logit_bound`), and for each weight, the
level just below or just above p, chosen at random so that the expected level is p (unbiased stochastic
rounding in probability space; a p beyond the outer levels, as a warm start's scores can be, takes the
outer level). The level indices travel range-coded against their own histogram (wire coder 6), and the
client starts its round from the levels' scores, against which it also codes its upload. Every client
of a round holds the same scores, so the server decodes their uploads against them too.

The draw is seeded by the run's seed and the round: the same bytes on the simulator and on Flower.
A client that held nothing before costs what a client that trained last round costs: no catch-up.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from prismfl.fl import aggregate, rangecode, wire
from prismfl.seeds import generator_for

MIN_LEVELS, MAX_LEVELS = 2, 256
_LEVELS = struct.Struct("<I")  # a quantized payload starts with L, then L u32 counts, then the coded indices


def check_levels(count: int) -> None:
    if not (isinstance(count, int) and MIN_LEVELS <= count <= MAX_LEVELS):
        raise ValueError(f"a quantized broadcast has {MIN_LEVELS}..{MAX_LEVELS} levels, got {count!r}")


def level_scores(count: int, smoothing: float) -> torch.Tensor:
    """The L scores (float32) the levels stand for: evenly spaced over [-bound, bound]."""
    check_levels(count)
    bound = aggregate.logit_bound(smoothing)
    return torch.linspace(-bound, bound, count, dtype=torch.float64).to(torch.float32)


def quantize(scores: torch.Tensor, count: int, smoothing: float, generator: torch.Generator) -> torch.Tensor:
    """Level indices (uint8) of one unbiased stochastic rounding of sigmoid(scores) to the L levels:
    for p between levels a < b, index b with probability (p - a) / (b - a), so E[level] = p."""
    levels = torch.sigmoid(level_scores(count, smoothing).double())
    p = torch.sigmoid(scores.detach().cpu().double())
    below = (torch.searchsorted(levels, p, right=True) - 1).clamp(0, count - 2)
    lo, hi = levels[below], levels[below + 1]
    frac = ((p - lo) / (hi - lo)).clamp(0.0, 1.0)
    up = torch.rand(p.shape, generator=generator, dtype=torch.float64) < frac
    return (below + up.long()).to(torch.uint8)


def dequantize(indices: torch.Tensor, count: int, smoothing: float) -> torch.Tensor:
    """The scores (float32) a client starts from: each index's level score."""
    return level_scores(count, smoothing)[indices.long()]


def round_indices(scores: torch.Tensor, count: int, smoothing: float, seed: int, round_: int) -> torch.Tensor:
    """The quantization the server broadcasts before `round_` (one per round, seeded by the run)."""
    return quantize(scores, count, smoothing, generator_for(seed, "downlink", round_))


def encode(indices: torch.Tensor, count: int, *, round_: int, table_hash: int) -> bytes:
    """A full-state message (coder 6) of the level indices: L, their histogram, the range-coded indices."""
    import constriction

    check_levels(count)
    values = indices.cpu().numpy().astype(np.int32).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= count):
        raise ValueError(f"level indices outside 0..{count - 1}")
    hist = np.bincount(values, minlength=count)
    enc = constriction.stream.queue.RangeEncoder()
    if values.size:
        enc.encode(values, rangecode.categorical(hist))
    payload = _LEVELS.pack(count) + hist.astype("<u4").tobytes() + enc.get_compressed().tobytes()
    return wire.Message(wire.KIND_STATE, wire.CODER_QUANTIZED, round_, wire.SERVER, table_hash, values.size,
                        payload).to_bytes()  # fmt: skip


def decode(data: bytes, *, num_weights: int, table_hash: int, count: int, round_: int) -> torch.Tensor:
    """The level indices of a quantized broadcast of `round_` with `count` levels; a WireError if the
    message is anything else (other levels, counts that are not the indices' own, stray bytes)."""
    import constriction

    msg = wire.parse(data, table_hash=table_hash, num_weights=num_weights)
    wire.expect(msg, kind=wire.KIND_STATE, coders=(wire.CODER_QUANTIZED,), round_=round_, client=wire.SERVER)
    table = _LEVELS.size + 4 * count
    if len(msg.payload) < table or (len(msg.payload) - table) % 4:
        raise wire.LengthMismatch("quantized payload is shorter than its histogram or not whole 32-bit words")
    (levels,) = _LEVELS.unpack_from(msg.payload)
    if levels != count:
        raise wire.UnexpectedMessage(f"a quantized broadcast of {levels} levels; this run's has {count}")
    hist = np.frombuffer(msg.payload[_LEVELS.size : table], dtype="<u4").astype(np.int64)
    if hist.sum() != num_weights:
        raise wire.UnexpectedMessage(f"quantized histogram counts {hist.sum():,} values, not {num_weights:,}")
    words = np.frombuffer(msg.payload[table:], dtype="<u4").astype(np.uint32)

    def run() -> np.ndarray:
        if not num_weights:
            return np.zeros(0, np.int32)
        return np.asarray(
            constriction.stream.queue.RangeDecoder(words).decode(rangecode.categorical(hist), num_weights)
        )

    values = wire.coder_call("quantized payload", run)
    indices = torch.from_numpy(values.astype(np.uint8))
    if (np.bincount(values, minlength=count)[:count] != hist).any() or values.max(initial=0) >= count \
            or encode(indices, count, round_=round_, table_hash=table_hash) != data:  # fmt: skip
        raise wire.LengthMismatch("quantized payload is not what its indices encode to (stray or altered bytes)")
    return indices
