"""prismfl's bytes inside Flower records.

Every payload is carried verbatim as a Flower ``Array`` of raw bytes (dtype uint8, stype
"prismfl/wire" for wire messages, "prismfl/state" for a client's saved state, a safestate blob that
cannot run code when read): Flower chunks large
arrays on the way, and what is counted in metrics.jsonl is exactly the prismfl message.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord

WIRE = "prismfl/wire"
STATE = "prismfl/state"
SECAGG = "prismfl/secagg"  # a masked vector of 64-bit words (secagg.py)


def to_array(data: bytes, stype: str = WIRE) -> Array:
    return Array(dtype="uint8", shape=(len(data),), stype=stype, data=bytes(data))


def from_array(array: Array, stype: str = WIRE) -> bytes:
    if not isinstance(array, Array):
        raise ValueError(f"expected a {stype} payload, got a {type(array).__name__}")
    if array.stype != stype:
        raise ValueError(f"expected a {stype} payload, got {array.stype!r}")
    return bytes(array.data)


def wire_record(messages: list[bytes]) -> ArrayRecord:
    """An ordered list of wire messages (keys 000, 001, ...: the order they must be applied in)."""
    return ArrayRecord({f"{i:03d}": to_array(m) for i, m in enumerate(messages)})


def wire_messages(record: ArrayRecord) -> list[bytes]:
    return [from_array(record[key]) for key in sorted(record.keys())]


LINK_KEY_BYTES = 32


def downlink_tag(key: bytes, rnd: int, steps: int, check: int | None, messages: list[bytes]) -> bytes:
    """HMAC-SHA256, under the key a client chose at set-up, of everything a round's train message tells
    it (round, steps, replica checksum, broadcasts in order): the client refuses a message whose tag does
    not match, so the checksum no longer travels as a plain field anyone on the path could rewrite."""
    import hashlib
    import hmac
    import struct

    mac = hmac.new(key, b"prismfl/downlink/v1" + struct.pack("<qqq", rnd, steps, -1 if check is None else check),
                   hashlib.sha256)  # fmt: skip
    for m in messages:
        mac.update(struct.pack("<Q", len(m)))
        mac.update(m)
    return mac.digest()
