"""Secure aggregation of the clients' noisy statistics (privacy.secagg; docs/privacy.md).

Distributed noise: each of the K clients adds Gaussian noise of standard deviation sigma / sqrt(K - c)
to its clipped sums, where sigma is the noise one central release needs for (epsilon, delta) and c the
number of clients assumed to collude with the server. The server sees only the sum of the K vectors,
which carries noise of standard deviation sigma x sqrt(K / (K - c)) >= sigma; whatever c clients
subtract of their own noise, the K - c others' still add up to sigma. No client's vector is DP on its
own, so clients train only against the pooled sum.

The server learns only that sum by pairwise masking (Bonawitz et al., CCS 2017, without the dropout
recovery): every pair of clients (i, j) agrees on a secret by X25519 key agreement over the server
(which relays the public keys), expands it with HKDF-SHA256 and AES-256-CTR into a vector of 64-bit
words, and i adds it while j subtracts it, modulo 2^64. Each client's message is its fixed-point
vector plus those masks: uniformly random to anyone without the other clients' secrets; in the sum
the masks cancel exactly. A client that fails between the key exchange and its masked reply makes
the sum unrecoverable: the run stops (SecAgg+ recovers with secret-shared keys; not implemented).

Fixed point: values are rounded to multiples of 2^-FRACTION_BITS and held as two's-complement 64-bit
integers; the sums the clients send are at most about 2^17 in clip units, far inside the 2^39 range.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from prismfl.errors import PrismError

FRACTION_BITS = 24
LIMIT = 2.0**38  # largest magnitude encoded (clip units); the sums stay far below it
KEY_BYTES = 32


class SecAggError(PrismError):
    """Secure aggregation cannot go on (a bad key, a message of the wrong size, a missing client)."""


# ---------------------------------------------------------------- the vector: layout and fixed point


def flatten(shared: dict) -> tuple[torch.Tensor, list[list[int]]]:
    """The noisy sums of privacy.private_feature_stats (sums, squares, counts) as one float64 vector,
    and its layout (the shapes, in that order)."""
    parts = [*shared["sums"], *shared["squares"], shared["counts"]]
    return torch.cat([p.double().reshape(-1) for p in parts]), [list(p.shape) for p in parts]


def unflatten(vector: torch.Tensor, layout: list[list[int]]) -> dict:
    sizes = [math.prod(s) for s in layout]
    parts = [p.reshape(s) for p, s in zip(torch.split(vector, sizes), layout)]
    layers = (len(parts) - 1) // 2
    return {"sums": parts[:layers], "squares": parts[layers:-1], "counts": parts[-1]}


def check_layout(layout, max_size: int = 1 << 28) -> int:
    """The number of words a layout holds; a SecAggError for anything that is not (2L + 1) shapes of
    small non-negative integers (it came over the network)."""
    if not (isinstance(layout, list) and len(layout) % 2 == 1 and 3 <= len(layout) <= 1001
            and all(isinstance(s, list) and 1 <= len(s) <= 3 and all(isinstance(d, int) and 0 < d <= max_size
                                                                      for d in s) for s in layout)):  # fmt: skip
        raise SecAggError("a secure-aggregation layout is not a list of 2L + 1 tensor shapes")
    size = sum(math.prod(s) for s in layout)
    if size > max_size:
        raise SecAggError(f"a secure-aggregation vector of {size:,} words is over the limit of {max_size:,}")
    return size


def encode(vector: torch.Tensor) -> np.ndarray:
    """Fixed point: round(v x 2^FRACTION_BITS) as two's-complement 64-bit words."""
    v = vector.double()
    if not bool(torch.isfinite(v).all()) or float(v.abs().max()) >= LIMIT:
        raise SecAggError(f"a value to aggregate is not finite or over {LIMIT:g} in magnitude")
    return torch.round(v * 2.0**FRACTION_BITS).to(torch.int64).numpy().view(np.uint64)


def decode(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.view(np.int64).astype(np.float64)) / 2.0**FRACTION_BITS


# ---------------------------------------------------------------- pairwise masks


def key_pair(private: bytes | None = None):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(private) if private is not None else X25519PrivateKey.generate()


def raw(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(key, "private_bytes"):
        return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())  # fmt: skip
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_public_key(key: bytes) -> None:
    """A peer's public key that every client can use: 32 bytes, not of small order (an exchange with it
    gives a non-zero secret); a SecAggError otherwise, before anyone depends on it."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    if not (isinstance(key, bytes) and len(key) == KEY_BYTES):
        raise SecAggError(f"a secure-aggregation public key is not {KEY_BYTES} bytes")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
    except ValueError as exc:
        raise SecAggError(f"a secure-aggregation public key is unusable: {exc}") from None


def mask(private, my_id: int, peer_id: int, peer_key: bytes, context: bytes, words: int) -> np.ndarray:
    """The mask pair (my_id, peer_id) shares: X25519, then HKDF-SHA256 bound to the run `context` and
    the pair, then AES-256-CTR over zeros. Both ends compute the same words."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if not (isinstance(peer_key, bytes) and len(peer_key) == KEY_BYTES):
        raise SecAggError(f"client {peer_id}'s public key is not {KEY_BYTES} bytes")
    try:
        secret = private.exchange(X25519PublicKey.from_public_bytes(peer_key))
    except ValueError as exc:  # an all-zero shared secret: a small-order key
        raise SecAggError(f"client {peer_id}'s public key is unusable: {exc}") from None
    low, high = sorted((my_id, peer_id))
    info = b"prismfl-secagg-v1:" + context + f":{low}:{high}".encode()
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(8 * words))
    return np.frombuffer(stream, dtype=np.uint64)


class SecAggClient:
    """A client's side: its fixed-point noisy vector and its X25519 key pair (never leaves it)."""

    def __init__(self, words: np.ndarray, layout: list[list[int]], private: bytes | None = None,
                 clip: list[float] | None = None):  # fmt: skip
        self.words, self.layout, self.clip = words, layout, clip or []
        self.key = key_pair(private)

    @classmethod
    def of_release(cls, shared: dict, clip: list[float] | None = None) -> SecAggClient:
        vector, layout = flatten(shared)
        return cls(encode(vector), layout, clip=clip)

    def public(self) -> dict:
        """What goes to the server at set-up: the public key, the vector's layout and the public clip
        bounds (the scale of its layers, for privacy.shrink)."""
        return {"public_key": raw(self.key.public_key()), "layout": self.layout, "clip": self.clip}

    def masked(self, my_id: int, keys: dict[int, bytes], context: bytes) -> np.ndarray:
        """Its vector plus the masks it shares with every other participant (+ with higher ids, - with
        lower), modulo 2^64."""
        if my_id not in keys or keys[my_id] != raw(self.key.public_key()):
            raise SecAggError(f"the key list for client {my_id} does not hold its own key")
        out = self.words.copy()
        for peer in sorted(keys):
            if peer == my_id:
                continue
            m = mask(self.key, my_id, peer, keys[peer], context, len(out))
            out = out + m if my_id < peer else out - m  # uint64: wraps modulo 2^64
        return out

    def to_tree(self) -> dict:
        """For the client's own saved state between messages (Flower's Context.state)."""
        private = torch.frombuffer(bytearray(raw(self.key)), dtype=torch.uint8)
        return {"words": torch.from_numpy(self.words.view(np.int64).copy()), "layout": self.layout,
                "private": private, "clip": self.clip}  # fmt: skip

    @classmethod
    def from_tree(cls, tree: dict) -> SecAggClient:
        try:
            words, layout, private = tree["words"], tree["layout"], bytes(tree["private"].numpy().tobytes())
            clip = check_clip(tree.get("clip", []))
            if check_layout(layout) != len(words) or words.dtype != torch.int64 or len(private) != KEY_BYTES:
                raise SecAggError("inconsistent")
        except (KeyError, TypeError, AttributeError, SecAggError) as exc:
            raise SecAggError(f"the client's secure-aggregation state is not usable: {exc}") from None
        return cls(words.numpy().view(np.uint64).copy(), layout, private, clip)


def check_clip(clip) -> list[float]:
    """Clip bounds that came over the network: a list of positive finite numbers (or empty)."""
    if not (isinstance(clip, list) and len(clip) <= 1000
            and all(isinstance(c, int | float) and math.isfinite(c) and c > 0 for c in clip)):  # fmt: skip
        raise SecAggError("secure-aggregation clip bounds are not a list of positive numbers")
    return [float(c) for c in clip]


def context_of(table_hash: int, participants) -> bytes:
    """What binds the masks to one run and one set of participants (a replayed message from another
    run or another set does not cancel)."""
    return f"{table_hash:016x}:{','.join(str(k) for k in sorted(participants))}".encode()


def aggregate(masked: dict[int, bytes], layout: list[list[int]]) -> dict:
    """The server's side: the sum of the participants' masked vectors modulo 2^64 (the masks cancel),
    decoded into the summed noisy statistics; a SecAggError for a message of the wrong size."""
    size = check_layout(layout)
    total = np.zeros(size, dtype=np.uint64)
    for k, data in sorted(masked.items()):
        if not isinstance(data, bytes | bytearray) or len(data) != 8 * size:
            raise SecAggError(f"client {k}'s masked vector is not {8 * size:,} bytes")
        total += np.frombuffer(data, dtype=np.uint64)
    return unflatten(decode(total), layout)
