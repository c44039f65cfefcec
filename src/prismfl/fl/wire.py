"""The wire format: every byte prismfl sends between clients and server, and how it is checked.

A message is a fixed 36-byte header followed by the payload:

    offset size  field
    0      4     magic b"PRFL"
    4      1     version (2)
    5      1     kind: 1 upload (a client's mask or weights), 2 broadcast delta, 3 full state
    6      1     coder: 0 packed bits, 1 range-coded Bernoulli, 2 range-coded binomial counts, 3 float32,
                 4 range-coded Bernoulli with a calibration table, 5 range-coded float32 byte planes,
                 6 range-coded probability levels (fl/quantize.py)
    7      1     reserved, 0
    8      4     round (u32)
    12     4     client (u32): who sent an upload; 0xFFFFFFFF for what the server sends
    16     8     layer-table hash: first 8 bytes of sha256 of the architecture's layer table
    24     4     number of weights N (u32)
    28     4     payload length in bytes (u32)
    32     4     CRC-32 of bytes 0..31 and of the payload

All integers are little-endian. An upload's payload is the mask, either packed (ceil(N/8) bytes) or
range-coded against the global probabilities both sides hold (about the cross-entropy of the mask
under those probabilities). A broadcast delta carries, for every weight, how many of the m uploads
kept it, range-coded against Binomial(m, global probability), plus m, MADA's lambda and the
smoothing: from these a client that holds the previous global scores rebuilds the new ones bit for
bit with the same function the server uses (`aggregate.apply_round`). A full state is float32
values, raw or (coder 5, for PRISM's broadcast state when smaller) losslessly coded: the four bytes of
each little-endian float32 as four planes, each plane's 256-symbol histogram (4 x 256 u32 counts), then
the planes range-coded against their histograms. Scores saturated at the clamp and a velocity that is
still zero cost next to nothing (a warm start's scores: about half their float32 size). A quantized
state (coder 6, `train.broadcast = "quantized"`) carries the number of levels L (u32), the L u32 counts
of its level indices, then the indices range-coded against those counts (fl/quantize.py).

A receiver checks everything before it allocates or computes: the sizes against the model's N (no
payload is larger than a float32 state), the reserved byte, the kind, coder, round and sender it
expects, and the ranges of m, lambda and the smoothing; a decoded payload must re-encode to the very
bytes received (the format is canonical, so trailing or altered bytes are refused), and float32
values must be finite. Whatever goes wrong, including a panic inside the entropy coder, is a
WireError. The range coders themselves are fl/rangecode.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from prismfl.bits import pack_mask, unpack_mask
from prismfl.errors import PrismError
from prismfl.fl import rangecode
from prismfl.model import masked

MAGIC = b"PRFL"
VERSION = 2
HEADER = struct.Struct("<4sBBBBIIQIII")
assert HEADER.size == 36
CRC_AT = HEADER.size - 4
SERVER = 0xFFFFFFFF  # the sender of broadcasts

KIND_UPLOAD, KIND_DELTA, KIND_STATE = 1, 2, 3
KINDS = {KIND_UPLOAD: "upload", KIND_DELTA: "broadcast delta", KIND_STATE: "broadcast state"}
CODER_PACKED, CODER_BERNOULLI, CODER_BINOMIAL, CODER_FLOAT32, CODER_CALIBRATED, CODER_PLANES = 0, 1, 2, 3, 4, 5
CODER_QUANTIZED = 6  # fl/quantize.py
CODERS = {CODER_PACKED: "packed", CODER_BERNOULLI: "range-bernoulli", CODER_BINOMIAL: "range-binomial",
          CODER_FLOAT32: "float32", CODER_CALIBRATED: "range-calibrated", CODER_PLANES: "range-planes",
          CODER_QUANTIZED: "range-quantized"}  # fmt: skip
UPLOAD_CODERS = ("auto", "range", "calibrated", "packed")
STATE_CODERS = ("float32", "auto")  # auto: range-coded byte planes where smaller than float32
CALIBRATION_BINS = 64  # a calibrated upload carries P(kept | global probability in bin b) for 64 bins
_DELTA_PREFIX = struct.Struct("<Hdd")  # m, lambda (NaN: no MADA), smoothing
_NO_LAMBDA = struct.pack("<d", float("nan"))  # the one NaN that means "no MADA"
# The most uploads one broadcast delta aggregates. constriction's Binomial model (0.4) never returns
# for some decoder states when m is in the hundreds (found by benchmarks/fuzz.py at m = 900 to 977), and
# a decode cannot be interrupted; m is checked against this bound, and the run's own, before decoding.
MAX_DELTA_M = 256
# The largest magnitude a float32 state may hold. Scores live within a few logits (the server's clamp
# is logit(1 - smoothing)), a server velocity within a few tens, a generator's dense weights (FedAvg)
# far below it; a value beyond it is a hostile or broken sender, refused like a non-finite one.
VALUE_LIMIT = 1e4


class WireError(PrismError):
    """A message that must not be accepted; subclasses say why."""


class TruncatedMessage(WireError):
    pass


class BadMagic(WireError):
    pass


class UnsupportedVersion(WireError):
    pass


class ChecksumMismatch(WireError):
    pass


class LengthMismatch(WireError):
    pass


class LayerTableMismatch(WireError):
    pass


class UnexpectedMessage(WireError):
    """Well-formed, but not what the receiver asked for (kind, coder or round)."""


def layer_table_hash(table: list[tuple[str, tuple[int, ...]]]) -> int:
    blob = json.dumps([[name, list(shape)] for name, shape in table], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little")


def model_layout(model: torch.nn.Module) -> tuple[int, int]:
    """(maskable weights N, layer-table hash): what server and clients check they agree on."""
    return masked.num_maskable(model), layer_table_hash(masked.layer_table(model))


@dataclass(frozen=True)
class Message:
    kind: int
    coder: int
    round: int
    client: int
    table_hash: int
    num_weights: int
    payload: bytes

    def to_bytes(self) -> bytes:
        head = HEADER.pack(MAGIC, VERSION, self.kind, self.coder, 0, self.round, self.client, self.table_hash,
                           self.num_weights, len(self.payload), 0)[:CRC_AT]  # fmt: skip
        crc = zlib.crc32(self.payload, zlib.crc32(head))
        return head + crc.to_bytes(4, "little") + self.payload


def max_payload(num_weights: int) -> int:
    """The largest payload a receiver accepts: a float32 state; an upload or delta never needs more
    (the server sends the full state instead of a larger delta, and 'auto' uploads are at most N/8)."""
    return 4 * num_weights + 2 * CALIBRATION_BINS + _DELTA_PREFIX.size


def parse(data: bytes, *, table_hash: int, num_weights: int) -> Message:
    """Check every header field against what the receiver expects; raise a WireError if any is off."""
    if len(data) < HEADER.size:
        raise TruncatedMessage(f"message of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, kind, coder, reserved, rnd, client, thash, n, length, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BadMagic(f"not a prismfl message (magic {magic!r})")
    if version != VERSION:
        raise UnsupportedVersion(f"message format version {version}; this prismfl speaks version {VERSION}")
    if reserved:
        raise UnexpectedMessage(f"reserved header byte is {reserved}, not 0")
    if n != num_weights:
        raise LayerTableMismatch(f"message carries {n} weights, this model has {num_weights}")
    if length > max_payload(num_weights):
        raise LengthMismatch(f"payload of {length:,} bytes is over the {max_payload(num_weights):,} this "
                             "model's messages can need")  # fmt: skip
    if len(data) < HEADER.size + length:
        raise TruncatedMessage(f"payload cut short: header promises {length} bytes, {len(data) - HEADER.size} came")
    if len(data) > HEADER.size + length:
        raise LengthMismatch(f"{len(data) - HEADER.size - length} stray bytes after the payload")
    payload = data[HEADER.size :]
    if zlib.crc32(payload, zlib.crc32(data[:CRC_AT])) != crc:
        raise ChecksumMismatch("message checksum does not match: corrupted in transit")
    if kind not in KINDS or coder not in CODERS:
        raise UnexpectedMessage(f"unknown message kind {kind} or coder {coder}")
    if thash != table_hash:
        raise LayerTableMismatch("message was made for another architecture (layer-table hash differs)")
    return Message(kind, coder, rnd, client, thash, n, payload)


def expect(msg: Message, *, kind: int, coders: tuple[int, ...], round_: int | None, client: int) -> None:
    """The message is the one the receiver waits for: its kind, a coder that kind uses, round and sender."""
    name = KINDS[kind]
    if msg.kind != kind:
        raise UnexpectedMessage(f"expected {_a(name)}, got {_a(KINDS[msg.kind])}")
    if msg.coder not in coders:
        raise UnexpectedMessage(f"{_a(name)} cannot use coder {CODERS[msg.coder]}")
    if round_ is not None and msg.round != round_:
        raise UnexpectedMessage(f"expected {_a(name)} for round {round_}, got one for round {msg.round}")
    if msg.client != client:
        who = lambda c: "the server" if c == SERVER else f"client {c}"  # noqa: E731
        raise UnexpectedMessage(f"expected {_a(name)} from {who(client)}, got one from {who(msg.client)}")


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def coder_call(what: str, call):
    """Run an entropy-coder call; anything it raises (a panic included) becomes a WireError."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - constriction panics raise pyo3's PanicException (a BaseException)
        raise ChecksumMismatch(f"{what} does not decode: {type(exc).__name__}: {str(exc)[:120]}") from None


# ---------------------------------------------------------------- payloads (range coding: fl/rangecode.py)


def _bernoulli_decode(payload: bytes, p: np.ndarray) -> np.ndarray:
    if len(payload) % 4:
        raise LengthMismatch("range-coded payload is not a whole number of 32-bit words")
    bits = coder_call("range-coded payload", lambda: rangecode.decode_bernoulli(payload, p))
    if rangecode.encode_bernoulli(bits, p) != payload:  # canonical: trailing or altered words are refused
        raise LengthMismatch("range-coded payload is not what its mask encodes to (stray or altered bytes)")
    return bits


def _bins(p: np.ndarray) -> np.ndarray:
    return np.minimum((p * CALIBRATION_BINS).astype(np.int64), CALIBRATION_BINS - 1)


def _calibration_table(q: np.ndarray) -> np.ndarray:
    return np.clip(q, 1, 65534).astype(np.float64) / 65535.0


def _calibrated_encode(bits: np.ndarray, p: np.ndarray) -> bytes:
    """Re-estimate P(kept) within 64 bins of the global probability from this very mask, send the 64
    estimates (16 bits each), and range-code the mask against them. A client whose model drifted
    from the global one (more decided, or decided differently) then pays about its conditional
    entropy given the global probability, never much more than 1 bit per weight."""
    b = _bins(p)
    ones = np.bincount(b, weights=bits, minlength=CALIBRATION_BINS)
    total = np.bincount(b, minlength=CALIBRATION_BINS)
    q = np.clip(np.round((ones + 0.5) / (total + 1.0) * 65535), 1, 65534).astype("<u2")
    return q.tobytes() + rangecode.encode_bernoulli(bits, _calibration_table(q)[b])


def _calibrated_decode(payload: bytes, p: np.ndarray) -> np.ndarray:
    head = 2 * CALIBRATION_BINS
    if len(payload) < head:
        raise LengthMismatch("calibrated payload is shorter than its calibration table")
    q = np.frombuffer(payload[:head], dtype="<u2")
    if q.min() < 1 or q.max() > 65534:
        raise UnexpectedMessage("calibration table holds a probability of 0 or 1")
    bits = _bernoulli_decode(payload[head:], _calibration_table(q)[_bins(p)])
    if _calibrated_encode(bits, p) != payload:  # the table must be the one the mask itself gives
        raise UnexpectedMessage("calibration table does not match the mask it carries")
    return bits


def encode_upload(mask: torch.Tensor, global_scores: torch.Tensor, *, round_: int, table_hash: int, client: int,
                  coder: str = "auto") -> bytes:  # fmt: skip
    """Client `client`'s mask as a message: 'packed' bits, 'range'-coded against the global
    probabilities, range-coded against 'calibrated' ones, or 'auto': whichever of the three is smallest."""
    if coder not in UPLOAD_CODERS:
        raise ValueError(f"unknown upload coder {coder!r}; expected one of {UPLOAD_CODERS}")
    n = mask.numel()
    candidates = {CODER_PACKED: pack_mask(mask)} if coder in ("auto", "packed") else {}
    if coder != "packed":
        bits, p = mask.cpu().numpy().reshape(-1), rangecode.probabilities(global_scores)
        if coder in ("auto", "range"):
            candidates[CODER_BERNOULLI] = rangecode.encode_bernoulli(bits, p)
        if coder in ("auto", "calibrated"):
            candidates[CODER_CALIBRATED] = _calibrated_encode(bits, p)
    best = min(candidates, key=lambda c: len(candidates[c]))
    return Message(KIND_UPLOAD, best, round_, client, table_hash, n, candidates[best]).to_bytes()


def decode_upload(data: bytes, global_scores: torch.Tensor, *, round_: int, table_hash: int,
                  client: int) -> torch.Tensor:  # fmt: skip
    """The mask of client `client`'s upload for round `round_`; a WireError for anything else."""
    n = global_scores.numel()
    msg = parse(data, table_hash=table_hash, num_weights=n)
    expect(msg, kind=KIND_UPLOAD, coders=(CODER_PACKED, CODER_BERNOULLI, CODER_CALIBRATED), round_=round_,
           client=client)  # fmt: skip
    if msg.coder == CODER_PACKED:
        try:
            return unpack_mask(msg.payload, n)
        except ValueError as exc:
            raise LengthMismatch(str(exc)) from None
    decode = _bernoulli_decode if msg.coder == CODER_BERNOULLI else _calibrated_decode
    return torch.from_numpy(decode(msg.payload, rangecode.probabilities(global_scores)).astype(bool))


def encode_delta(counts: torch.Tensor, m: int, lam: float | None, smoothing: float, global_scores: torch.Tensor,
                 *, round_: int, table_hash: int) -> bytes:  # fmt: skip
    """The round's outcome for clients that hold the previous global scores (see module doc)."""
    n = counts.numel()
    if not 1 <= m <= MAX_DELTA_M:
        raise ValueError(f"a broadcast delta aggregates 1 to {MAX_DELTA_M} uploads, not {m}")
    # (+ 0.0 writes a -0.0 as 0.0: the one byte pattern a receiver accepts)
    prefix = _DELTA_PREFIX.pack(m, float("nan") if lam is None else lam + 0.0, smoothing + 0.0)
    payload = prefix + rangecode.encode_binomial(counts.cpu().numpy(), m, rangecode.probabilities(global_scores))
    return Message(KIND_DELTA, CODER_BINOMIAL, round_, SERVER, table_hash, n, payload).to_bytes()


@dataclass
class Delta:
    counts: torch.Tensor  # int32, uploads that kept each weight
    m: int
    lam: float | None
    smoothing: float


def _negative_zero(x: float) -> bool:
    """-0.0, which compares equal to 0.0 but is not the canonical byte pattern prismfl writes."""
    return x == 0.0 and math.copysign(1.0, x) < 0


def decode_delta(data: bytes, global_scores: torch.Tensor, *, round_: int, table_hash: int,
                 max_m: int = MAX_DELTA_M) -> Delta:  # fmt: skip
    n = global_scores.numel()
    msg = parse(data, table_hash=table_hash, num_weights=n)
    expect(msg, kind=KIND_DELTA, coders=(CODER_BINOMIAL,), round_=round_, client=SERVER)
    if len(msg.payload) < _DELTA_PREFIX.size or (len(msg.payload) - _DELTA_PREFIX.size) % 4:
        raise LengthMismatch("broadcast delta payload has the wrong length")
    m, lam, smoothing = _DELTA_PREFIX.unpack_from(msg.payload)
    if not 1 <= m <= min(max_m, MAX_DELTA_M):  # before the coder sees it (see MAX_DELTA_M)
        raise UnexpectedMessage(f"broadcast delta aggregates m = {m} uploads; a round of this run has 1 to "
                                f"{min(max_m, MAX_DELTA_M)}")  # fmt: skip
    if not (0.0 <= lam <= 1.0 or struct.pack("<d", lam) == _NO_LAMBDA) or _negative_zero(lam):
        raise UnexpectedMessage(f"broadcast delta carries lambda = {lam}, outside [0, 1] (and not 'no MADA')")
    if not 0.0 <= smoothing < 0.5 or _negative_zero(smoothing):
        raise UnexpectedMessage(f"broadcast delta carries smoothing = {smoothing}, outside [0, 0.5)")
    p = rangecode.probabilities(global_scores)
    if not np.isfinite(p).all():
        raise UnexpectedMessage("the global scores this delta applies to are not finite")
    coded = msg.payload[_DELTA_PREFIX.size :]
    counts = coder_call("broadcast delta", lambda: rangecode.decode_binomial(coded, m, p))
    if rangecode.encode_binomial(counts, m, p) != coded:
        raise LengthMismatch("broadcast delta is not what its counts encode to (stray or altered bytes)")
    return Delta(torch.from_numpy(counts), m, None if np.isnan(lam) else lam, smoothing)


def _planes_decode(payload: bytes, n: int) -> np.ndarray:
    """Inverse of rangecode.encode_planes; the histograms must sum to n, and the payload must re-encode exactly."""
    if len(payload) < rangecode.PLANE_TABLE or (len(payload) - rangecode.PLANE_TABLE) % 4:
        raise LengthMismatch("byte-plane payload is shorter than its histograms or not whole 32-bit words")
    if len(payload) >= 4 * n:  # the encoder sends raw float32 then
        raise UnexpectedMessage("a byte-plane state no smaller than the raw float32 values")
    counts = np.frombuffer(payload[: rangecode.PLANE_TABLE], dtype="<u4").reshape(4, 256).astype(np.int64)
    if (counts.sum(axis=1) != n).any():
        raise UnexpectedMessage(f"byte-plane histograms do not count {n} values each")
    values = coder_call("byte-plane payload", lambda: rangecode.decode_planes(payload, n))
    if rangecode.encode_planes(values) != payload:  # canonical: the histograms are the values' own, no stray words
        raise LengthMismatch("byte-plane payload is not what its values encode to (stray or altered bytes)")
    return values


def encode_state(values: torch.Tensor, *, round_: int, table_hash: int, client: int = SERVER,
                 coder: str = "float32") -> bytes:  # fmt: skip
    """Float32 values as one message: the full global state the server sends (client = SERVER), or a
    client's float upload (fedavg's weights, local's and central's own scores). coder 'float32' sends
    them raw; 'auto' sends the range-coded byte planes where those are smaller (lossless either way)."""
    if coder not in STATE_CODERS:
        raise ValueError(f"unknown state coder {coder!r}; expected one of {STATE_CODERS}")
    raw = values.detach().cpu().to(torch.float32).numpy().astype("<f4").reshape(-1)
    best, payload = CODER_FLOAT32, raw.tobytes()
    if coder == "auto" and len(payload) > rangecode.PLANE_TABLE:
        planes = rangecode.encode_planes(raw)
        if len(planes) < len(payload):
            best, payload = CODER_PLANES, planes
    return Message(KIND_STATE, best, round_, client, table_hash, raw.size, payload).to_bytes()


def decode_state(data: bytes, *, num_weights: int, table_hash: int, client: int = SERVER) -> tuple[int, torch.Tensor]:
    """(round, finite float32 values) of a state message from `client` (the server by default)."""
    msg = parse(data, table_hash=table_hash, num_weights=num_weights)
    coders = (CODER_FLOAT32, CODER_PLANES) if client == SERVER else (CODER_FLOAT32,)  # clients send raw floats
    expect(msg, kind=KIND_STATE, coders=coders, round_=None, client=client)
    if msg.coder == CODER_PLANES:
        values = _planes_decode(msg.payload, num_weights)
    elif len(msg.payload) != 4 * num_weights:
        raise LengthMismatch(f"state payload has {len(msg.payload)} bytes, expected {4 * num_weights}")
    else:
        values = np.frombuffer(msg.payload, dtype="<f4")
    if values.size and not np.abs(values).max() <= VALUE_LIMIT:  # NaN fails the comparison too
        raise UnexpectedMessage(f"state holds values that are not finite or beyond +-{VALUE_LIMIT:g}")
    return msg.round, torch.from_numpy(values.astype(np.float32))
