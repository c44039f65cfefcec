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
