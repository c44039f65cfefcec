import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prismfl.fl import aggregate, rangecode, wire

TABLE = wire.layer_table_hash([("fc1", (4, 8)), ("fc2", (8, 8))])


def _scores(n, seed=0, scale=3.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def _cross_entropy_bits(mask, scores):
    p = torch.sigmoid(scores.double()).numpy()
    m = mask.numpy()
    return float(-(np.log2(np.where(m, p, 1 - p))).sum())


def test_header_layout_exact_bytes():
    msg = wire.Message(wire.KIND_UPLOAD, wire.CODER_PACKED, 7, 3, 0x0102030405060708, 10, b"\xab\x01").to_bytes()
    assert msg[:4] == b"PRFL" and msg[4] == 2 and msg[5] == 1 and msg[6] == 0 and msg[7] == 0
    assert struct.unpack_from("<IIQII", msg, 8) == (7, 3, 0x0102030405060708, 10, 2)
    assert struct.unpack_from("<I", msg, 32)[0] == zlib.crc32(b"\xab\x01", zlib.crc32(msg[:32]))
    assert len(msg) == 36 + 2 and msg[36:] == b"\xab\x01"


@pytest.mark.parametrize("coder", ["packed", "range", "calibrated", "auto"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 8.0, 30.0])
def test_upload_round_trip(coder, scale):
    n = 5000
    scores = _scores(n, 1, scale)
    mask = aggregate.sample_mask(scores, torch.Generator().manual_seed(2))
    data = wire.encode_upload(mask, scores, round_=3, table_hash=TABLE, client=5, coder=coder)
    back = wire.decode_upload(data, scores, round_=3, table_hash=TABLE, client=5)
    assert torch.equal(back, mask)
    if coder == "packed":
        assert len(data) == wire.HEADER.size + math.ceil(n / 8)


def test_calibrated_coder_beats_a_stale_global_model():
    # the client's model drifted: it keeps weights with probability 0.1 where the global model says 0.6,
    # and 0.9 where the global says 0.4 -> coding against the global costs ~1.26 bits/weight,
    # against the calibrated table ~H(0.1) = 0.47 bits/weight
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    scores = torch.where(torch.rand(n, generator=gen) < 0.5, 0.405, -0.405)  # p = 0.6 / 0.4
    mask = torch.where(scores > 0, torch.rand(n, generator=gen) < 0.1, torch.rand(n, generator=gen) < 0.9)
    sizes = {c: len(wire.encode_upload(mask, scores, round_=1, table_hash=TABLE, client=5, coder=c)) - wire.HEADER.size
             for c in ("packed", "range", "calibrated", "auto")}  # fmt: skip
    h = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert sizes["calibrated"] * 8 / n == pytest.approx(h, abs=0.01)
    assert sizes["range"] > sizes["packed"] > sizes["calibrated"] == sizes["auto"]
    for c in ("range", "calibrated"):
        data = wire.encode_upload(mask, scores, round_=1, table_hash=TABLE, client=5, coder=c)
        assert torch.equal(wire.decode_upload(data, scores, round_=1, table_hash=TABLE, client=5), mask)


def test_extreme_mask_against_opposite_probabilities_still_round_trips():
    n = 2000
    scores = torch.full((n,), 40.0)  # probability ~1 of keeping
    mask = torch.zeros(n, dtype=torch.bool)  # and nothing kept
    data = wire.encode_upload(mask, scores, round_=1, table_hash=TABLE, client=5, coder="range")
    assert torch.equal(wire.decode_upload(data, scores, round_=1, table_hash=TABLE, client=5), mask)
    auto = wire.encode_upload(mask, scores, round_=1, table_hash=TABLE, client=5, coder="auto")
    assert (
        len(auto) < wire.HEADER.size + n // 8
    )  # auto picks the calibrated coder: an all-zero mask costs almost nothing
    assert (
        wire.encode_upload(mask, scores, round_=1, table_hash=TABLE, client=5, coder="range")[6] == wire.CODER_BERNOULLI
    )


@pytest.mark.parametrize("scale", [1.0, 3.0, 6.0])
def test_range_coded_size_near_cross_entropy(scale):
    n = 200_000
    scores = _scores(n, 3, scale)
    mask = aggregate.sample_mask(scores, torch.Generator().manual_seed(4))
    data = wire.encode_upload(mask, scores, round_=1, table_hash=TABLE, client=5, coder="range")
    bound_bytes = _cross_entropy_bits(mask, scores) / 8
    payload = len(data) - wire.HEADER.size
    assert payload <= bound_bytes * 1.01 + 16  # within 1% of the bound, plus the coder's final words
    assert payload * 8 / n < 1.0


def test_a_paper_sized_mask_round_trips():
    """3.5M weights (the paper's generator) through the range coder and back; its speed is measured by
    benchmarks/codec.py (docs/performance.md), not asserted here."""
    n = 3_543_616
    scores = _scores(n, 5, 3.0)
    mask = aggregate.sample_mask(scores, torch.Generator().manual_seed(6))
    data = wire.encode_upload(mask, scores, round_=1, table_hash=TABLE, client=5, coder="range")
    assert torch.equal(wire.decode_upload(data, scores, round_=1, table_hash=TABLE, client=5), mask)


def test_delta_rebuilds_global_state_bit_for_bit():
    n, m = 20_000, 4
    old = _scores(n, 7)
    masks = [aggregate.sample_mask(old + i, torch.Generator().manual_seed(i)) for i in range(m)]
    counts = aggregate.count_masks(masks)
    lam = aggregate.mada_lambda(old, aggregate.aggregate_scores(counts, m), torch.Generator().manual_seed(9))
    new_server = aggregate.apply_round(old, counts, m, lam, 0.01)
    data = wire.encode_delta(counts, m, lam, 0.01, old, round_=5, table_hash=TABLE)
    delta = wire.decode_delta(data, old, round_=5, table_hash=TABLE)
    assert torch.equal(delta.counts, counts) and delta.m == m and delta.lam == lam
    new_client = aggregate.apply_round(old, delta.counts, delta.m, delta.lam, delta.smoothing)
    assert torch.equal(new_client, new_server)
    assert len(data) < 4 * n / 4  # far below broadcasting float32 scores


def test_delta_without_mada():
    old = _scores(100, 1)
    counts = torch.randint(0, 3, (100,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    delta = wire.decode_delta(wire.encode_delta(counts, 2, None, 0.01, old, round_=1, table_hash=TABLE), old,
                              round_=1, table_hash=TABLE)  # fmt: skip
    assert delta.lam is None


def test_state_round_trip():
    s = _scores(1000, 2)
    rnd, back = wire.decode_state(wire.encode_state(s, round_=9, table_hash=TABLE), num_weights=1000, table_hash=TABLE)
    assert rnd == 9 and torch.equal(back, s)


def _upload(n=1000):
    scores = _scores(n, 1)
    mask = aggregate.sample_mask(scores, torch.Generator().manual_seed(2))
    return wire.encode_upload(mask, scores, round_=2, table_hash=TABLE, client=5, coder="range"), scores


@pytest.mark.parametrize(
    "mutate,error",
    [
        (lambda d: d[:20], wire.TruncatedMessage),
        (lambda d: d[:-3], wire.TruncatedMessage),
        (lambda d: d + b"\x00", wire.LengthMismatch),
        (lambda d: b"XXXX" + d[4:], wire.BadMagic),
        (lambda d: d[:4] + b"\x09" + d[5:], wire.UnsupportedVersion),
        (lambda d: d[:40] + bytes([d[40] ^ 0x10]) + d[41:], wire.ChecksumMismatch),
        (lambda d: d[:8] + (3).to_bytes(4, "little") + d[12:], wire.ChecksumMismatch),  # round edited, CRC stale
    ],
)
def test_corrupted_uploads_are_rejected(mutate, error):
    data, scores = _upload()
    with pytest.raises(error):
        wire.decode_upload(mutate(data), scores, round_=2, table_hash=TABLE, client=5)


def test_wrong_round_table_or_size_is_rejected():
    data, scores = _upload()
    with pytest.raises(wire.UnexpectedMessage, match="round 3"):
        wire.decode_upload(data, scores, round_=3, table_hash=TABLE, client=5)
    with pytest.raises(wire.LayerTableMismatch):
        wire.decode_upload(data, scores, round_=2, table_hash=TABLE + 1, client=5)
    with pytest.raises(wire.LayerTableMismatch, match="1000 weights"):
        wire.decode_upload(data, _scores(999), round_=2, table_hash=TABLE, client=5)


def test_message_of_the_wrong_kind_is_rejected():
    s = _scores(1000)
    state = wire.encode_state(s, round_=2, table_hash=TABLE)
    with pytest.raises(wire.UnexpectedMessage, match="broadcast state"):
        wire.decode_upload(state, s, round_=2, table_hash=TABLE, client=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_never_crash(data):
    scores = _scores(1000)
    try:
        wire.decode_upload(data, scores, round_=2, table_hash=TABLE, client=5)
    except wire.WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 255))
def test_fuzz_single_byte_corruption_is_caught(pos_seed, value):
    data, scores = _upload(800)
    pos = pos_seed % len(data)
    if data[pos] == value:
        return
    bad = data[:pos] + bytes([value]) + data[pos + 1 :]
    with pytest.raises(wire.WireError):
        wire.decode_upload(bad, scores, round_=2, table_hash=TABLE, client=5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300), st.floats(-20, 20))
def test_fuzz_round_trip(bits, shift):
    mask = torch.tensor(bits)
    scores = _scores(len(bits), 3) + shift
    for coder in ("packed", "range", "calibrated", "auto"):
        data = wire.encode_upload(mask, scores, round_=0, table_hash=TABLE, client=5, coder=coder)
        assert torch.equal(wire.decode_upload(data, scores, round_=0, table_hash=TABLE, client=5), mask)


# ---------------------------------------------------------------- hostile messages: CRC recomputed


def reseal(data: bytes) -> bytes:
    """The message with its CRC recomputed: what an attacker (not a broken link) sends."""
    head, payload = data[: wire.CRC_AT], data[wire.HEADER.size :]
    return head + zlib.crc32(payload, zlib.crc32(head)).to_bytes(4, "little") + payload


def with_length(data: bytes, payload: bytes) -> bytes:
    head = bytearray(data[: wire.HEADER.size])
    struct.pack_into("<I", head, 28, len(payload))
    return reseal(bytes(head) + payload)


def _delta(n=500, m=3, lam=0.25):
    scores = _scores(n, 4)
    counts = torch.randint(0, m + 1, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    return wire.encode_delta(counts, m, lam, 0.01, scores, round_=2, table_hash=TABLE), scores, counts


def test_a_resealed_reserved_byte_is_rejected():
    data, scores = _upload()
    with pytest.raises(wire.UnexpectedMessage, match="reserved"):
        wire.decode_upload(reseal(data[:7] + b"\x01" + data[8:]), scores, round_=2, table_hash=TABLE, client=5)


@pytest.mark.parametrize("coder", ["range", "calibrated"])
@pytest.mark.parametrize("extra", [b"\x00\x00\x00\x00", b"\x01\x02\x03\x04" * 3])
def test_trailing_words_after_a_range_payload_are_rejected(coder, extra):
    scores = _scores(1000, 1)
    mask = aggregate.sample_mask(scores, torch.Generator().manual_seed(2))
    data = wire.encode_upload(mask, scores, round_=2, table_hash=TABLE, client=5, coder=coder)
    with pytest.raises(wire.WireError):
        wire.decode_upload(with_length(data, data[wire.HEADER.size :] + extra), scores, round_=2, table_hash=TABLE,
                           client=5)  # fmt: skip


def test_an_oversized_upload_is_refused_before_its_bytes_are_read():
    data, scores = _upload(1000)
    head = bytearray(data[: wire.HEADER.size])
    struct.pack_into("<I", head, 28, 64 << 20)  # promises 64 MiB for a 1,000-weight model
    with pytest.raises(wire.LengthMismatch, match="over the"):
        wire.decode_upload(bytes(head), scores, round_=2, table_hash=TABLE, client=5)


def test_an_upload_from_another_client_or_sent_as_the_server_is_rejected():
    data, scores = _upload()
    with pytest.raises(wire.UnexpectedMessage, match="from client 6, got one from client 5"):
        wire.decode_upload(data, scores, round_=2, table_hash=TABLE, client=6)
    delta, s, _ = _delta(1000)
    with pytest.raises(wire.UnexpectedMessage):
        wire.decode_upload(delta, s, round_=2, table_hash=TABLE, client=5)


def test_a_calibration_table_that_is_not_the_masks_own_is_rejected():
    scores = _scores(1000, 1)
    mask = aggregate.sample_mask(scores, torch.Generator().manual_seed(2))
    data = bytearray(wire.encode_upload(mask, scores, round_=2, table_hash=TABLE, client=5, coder="calibrated"))
    data[wire.HEADER.size] ^= 0x01  # one table entry off by one
    with pytest.raises(wire.WireError):
        wire.decode_upload(reseal(bytes(data)), scores, round_=2, table_hash=TABLE, client=5)


def delta_with(data: bytes, m=None, lam=None, smoothing=None) -> bytes:
    payload = bytearray(data[wire.HEADER.size :])
    old = struct.unpack_from("<Hdd", payload)
    struct.pack_into("<Hdd", payload, 0, *(o if v is None else v for o, v in zip(old, (m, lam, smoothing))))
    return reseal(data[: wire.HEADER.size] + bytes(payload))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"m": 0}, "m = 0"),
        ({"lam": 1.5}, "lambda"),
        ({"lam": -0.1}, "lambda"),
        ({"lam": float("inf")}, "lambda"),
        ({"smoothing": 0.5}, "smoothing"),
        ({"smoothing": float("nan")}, "smoothing"),
        ({"m": 2}, "decode|encode"),  # counts coded for m = 3 do not decode as m = 2, or to other bytes
    ],
)
def test_a_delta_with_fields_out_of_range_is_a_wire_error_never_a_panic(change, message):
    data, scores, _ = _delta()
    with pytest.raises(wire.WireError, match=message):
        wire.decode_delta(delta_with(data, **change), scores, round_=2, table_hash=TABLE)


def test_a_delta_with_another_coder_byte_or_extra_words_is_rejected():
    data, scores, counts = _delta()
    assert torch.equal(wire.decode_delta(data, scores, round_=2, table_hash=TABLE).counts, counts)
    with pytest.raises(wire.UnexpectedMessage, match="cannot use coder"):
        wire.decode_delta(
            reseal(data[:6] + bytes([wire.CODER_BERNOULLI]) + data[7:]), scores, round_=2, table_hash=TABLE
        )
    with pytest.raises(wire.WireError):
        wire.decode_delta(with_length(data, data[wire.HEADER.size :] + b"\0\0\0\0"), scores, round_=2, table_hash=TABLE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_state_with_non_finite_values_is_rejected(bad):
    s = _scores(100)
    s[7] = bad
    with pytest.raises(wire.UnexpectedMessage, match="not finite"):
        wire.decode_state(wire.encode_state(s, round_=1, table_hash=TABLE), num_weights=100, table_hash=TABLE)


def test_a_float_upload_names_its_client():
    data = wire.encode_state(_scores(100), round_=1, table_hash=TABLE, client=4)
    assert wire.decode_state(data, num_weights=100, table_hash=TABLE, client=4)[0] == 1
    with pytest.raises(wire.UnexpectedMessage, match="from the server, got one from client 4"):
        wire.decode_state(data, num_weights=100, table_hash=TABLE)


CODER_NAMES = {wire.CODER_PACKED: "packed", wire.CODER_BERNOULLI: "range", wire.CODER_CALIBRATED: "calibrated"}


def decode_and_reencode(kind: str, data: bytes, scores: torch.Tensor) -> bytes:
    """Decode `data` as the receiver does, then encode what came out again: an accepted message must
    come back byte for byte (the format is canonical; anything else is a wrong accept)."""
    if kind == "upload":
        mask = wire.decode_upload(data, scores, round_=2, table_hash=TABLE, client=5)
        return wire.encode_upload(mask, scores, round_=2, table_hash=TABLE, client=5, coder=CODER_NAMES[data[6]])
    if kind == "delta":
        d = wire.decode_delta(data, scores, round_=2, table_hash=TABLE)
        return wire.encode_delta(d.counts, d.m, d.lam, d.smoothing, scores, round_=2, table_hash=TABLE)
    rnd, values = wire.decode_state(data, num_weights=scores.numel(), table_hash=TABLE)
    return wire.encode_state(values, round_=rnd, table_hash=TABLE, coder=STATE_CODER[data[6]])


STATE_CODER = {wire.CODER_FLOAT32: "float32", wire.CODER_PLANES: "auto"}
CLAMP = 4.59512  # logit(0.99): where a confident warm start's scores pile up


def _message(kind: str):
    if kind == "upload":
        data, scores = _upload(300)
    elif kind == "delta":
        data, scores, _ = _delta(300)
    elif kind == "state":
        scores = _scores(300)
        data = wire.encode_state(scores * 2, round_=2, table_hash=TABLE)
    else:  # a range-coded state: scores mostly at the clamp
        scores = _scores(2000, 4, 10.0).clamp(-CLAMP, CLAMP)
        data = wire.encode_state(scores, round_=2, table_hash=TABLE, coder="auto")
        assert data[6] == wire.CODER_PLANES
    return data, scores


@pytest.mark.parametrize("kind", ["upload", "delta", "state", "planes"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 12), st.binary(max_size=8))  # fmt: skip
def test_fuzz_resealed_mutations_are_refused_or_canonical(kind, edits, cut, tail):
    """Byte edits, a cut and appended bytes, with the CRC recomputed each time: either a WireError,
    or a message that re-encodes to itself (another valid message, never a malformed one accepted)."""
    data, scores = _message(kind)
    bad = bytearray(data)
    for pos, value in edits:
        bad[pos % len(bad)] = value
    bad = bytes(bad[: len(bad) - cut]) + tail
    if len(bad) >= wire.HEADER.size:
        bad = with_length(bad, bad[wire.HEADER.size :]) if tail or cut else reseal(bad)
    try:
        again = decode_and_reencode(kind, bad, scores)
    except wire.WireError:
        return
    assert again == bad


# ---------------------------------------------------------------- range-coded float32 states (coder 5)


def _planes_payload(data: bytes) -> tuple[np.ndarray, bytes]:
    payload, table = data[wire.HEADER.size :], rangecode.PLANE_TABLE
    return np.frombuffer(payload[:table], dtype="<u4").reshape(4, 256), payload[table:]


@pytest.mark.parametrize("values", [
    _scores(50_000, 5, 10.0).clamp(-CLAMP, CLAMP),  # a confident state: most scores at the clamp
    torch.zeros(50_000),  # the server's velocity right after a warm start
    _scores(50_000, 6, 1.0),  # plain Gaussian floats: little to gain
], ids=["clamped", "zeros", "gaussian"])  # fmt: skip
def test_a_coded_state_round_trips_bit_for_bit_and_is_never_larger(values):
    raw = wire.encode_state(values, round_=3, table_hash=TABLE)
    coded = wire.encode_state(values, round_=3, table_hash=TABLE, coder="auto")
    assert raw[6] == wire.CODER_FLOAT32 and len(raw) == wire.HEADER.size + 4 * values.numel()
    rnd, back = wire.decode_state(coded, num_weights=values.numel(), table_hash=TABLE)
    assert rnd == 3 and torch.equal(back.view(torch.int32), values.view(torch.int32))  # bits, -0.0 included
    assert len(coded) <= len(raw)


def test_coded_state_sizes_and_histograms_exact():
    n = 50_000
    zeros = wire.encode_state(torch.zeros(n), round_=1, table_hash=TABLE, coder="auto")
    counts, stream = _planes_payload(zeros)
    expected = np.zeros((4, 256), np.uint32)
    expected[:, 0] = n  # every byte of +0.0 is 0x00
    assert zeros[6] == wire.CODER_PLANES and np.array_equal(counts, expected)
    assert len(stream) <= 16  # one symbol of probability ~1 per plane: next to nothing
    # half the values at +clamp, half at -clamp: one bit each at most, plus the table
    signs = torch.where(torch.arange(n) % 2 == 0, CLAMP, -CLAMP)
    counts, stream = _planes_payload(wire.encode_state(signs, round_=1, table_hash=TABLE, coder="auto"))
    b = np.frombuffer(np.float32(CLAMP).tobytes(), np.uint8)
    assert counts[3, b[3]] == n // 2 and counts[3, b[3] | 0x80] == n // 2  # the sign bit lives in byte 3
    assert [counts[j, b[j]] for j in range(3)] == [n, n, n]
    assert n / 8 <= len(stream) <= n / 8 * 1.01 + 16
    # Gaussian floats: the low mantissa bytes are close to uniform, so about 3 of 4 bytes remain
    gauss = wire.encode_state(_scores(n, 6, 1.0), round_=1, table_hash=TABLE, coder="auto")
    assert 0.75 < len(gauss) / (4 * n) < 0.9


def test_small_states_stay_raw_float32():
    """Where the 4 KB of histograms outweigh the saving, 'auto' sends float32."""
    data = wire.encode_state(torch.zeros(1000), round_=1, table_hash=TABLE, coder="auto")
    assert data[6] == wire.CODER_FLOAT32
    data = wire.encode_state(_scores(2000, 8), round_=1, table_hash=TABLE, coder="auto")  # 8,000 bytes raw
    assert data[6] == wire.CODER_FLOAT32 and len(data) == wire.HEADER.size + 8000  # coded: table + ~6,000
    with pytest.raises(ValueError, match="unknown state coder"):
        wire.encode_state(torch.zeros(10), round_=1, table_hash=TABLE, coder="zlib")


def _planes_message(payload: bytes, n: int) -> bytes:
    return wire.Message(wire.KIND_STATE, wire.CODER_PLANES, 1, wire.SERVER, TABLE, n, payload).to_bytes()


def test_hostile_coded_states_are_refused():
    n = 5000
    good = wire.encode_state(_scores(n, 7, 10.0).clamp(-CLAMP, CLAMP), round_=1, table_hash=TABLE, coder="auto")
    counts, stream = _planes_payload(good)
    table = counts.copy()
    table[0, 0] += 1  # a histogram that does not count n values
    cases = [
        (stream[:100], wire.LengthMismatch, "shorter than its histograms"),
        (counts.tobytes() + stream + b"\0", wire.LengthMismatch, "whole 32-bit words"),
        (table.tobytes() + stream, wire.UnexpectedMessage, "do not count 5000"),
        (counts.tobytes() + stream + b"\0\0\0\0", wire.LengthMismatch, "stray or altered"),  # a stray word
        (counts.tobytes() + bytes([stream[0] ^ 0x40]) + stream[1:], wire.WireError, None),  # an altered word
        (counts.tobytes() + bytes(4 * n - rangecode.PLANE_TABLE), wire.UnexpectedMessage, "no smaller than"),
    ]
    for payload, error, says in cases:
        with pytest.raises(error, match=says):
            wire.decode_state(_planes_message(payload, n), num_weights=n, table_hash=TABLE)
    # clients send their floats raw: a coded state from a client is refused
    coded = wire.encode_state(_scores(n, 7, 10.0).clamp(-CLAMP, CLAMP), round_=1, table_hash=TABLE, client=2,
                              coder="auto")  # fmt: skip
    with pytest.raises(wire.UnexpectedMessage, match="cannot use coder range-planes"):
        wire.decode_state(coded, num_weights=n, table_hash=TABLE, client=2)
    # histograms and a stream that decode, but to a NaN: refused like a float32 NaN
    nan = np.full(n, CLAMP, np.float32)
    nan[3] = np.nan
    with pytest.raises(wire.UnexpectedMessage, match="not finite"):
        wire.decode_state(_planes_message(rangecode.encode_planes(nan), n), num_weights=n, table_hash=TABLE)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3), st.integers(0, 8),
       st.booleans())  # fmt: skip
def test_fuzz_coded_state_streams_never_crash(edits, cut_words, keep_table):
    """A real state's histograms (or edited ones) and its stream with byte edits and words cut off: a
    WireError, or a state that re-encodes to the very bytes (with no edit, the message itself)."""
    n = 5000
    counts, stream = _planes_payload(wire.encode_state(_scores(n, 7, 10.0).clamp(-CLAMP, CLAMP), round_=1,
                                                       table_hash=TABLE, coder="auto"))  # fmt: skip
    payload = bytearray(counts.tobytes() + stream[: len(stream) - 4 * cut_words])
    for pos, value in edits:
        at = pos % len(payload)
        if keep_table and at < rangecode.PLANE_TABLE:
            at = rangecode.PLANE_TABLE + at % (len(payload) - rangecode.PLANE_TABLE)
        payload[at] = value
    data = _planes_message(bytes(payload), n)
    try:
        rnd, values = wire.decode_state(data, num_weights=n, table_hash=TABLE)
    except wire.WireError:
        return
    assert wire.encode_state(values, round_=rnd, table_hash=TABLE, coder="auto") == data
