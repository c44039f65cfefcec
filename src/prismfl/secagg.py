"""Secure aggregation of the clients' noisy statistics (privacy.secagg; docs/privacy.md).

Distributed noise: each of the K clients adds Gaussian noise of standard deviation sigma / sqrt(M - c)
to its clipped sums, where sigma is the noise one central release needs for (epsilon, delta), c the
number of clients assumed to collude with the server and M = K - floor(privacy.dropouts x K) the
fewest clients whose vectors the server may unmask (`min_survivors`). The server sees only the sum
of the S >= M vectors that reached it, whose noise has standard deviation sigma x sqrt(S / (M - c))
>= sigma; whatever c clients subtract of their own noise, the S - c >= M - c others' still add up
to sigma. No client's vector is DP on its own, so clients train only against the pooled sum.

The server learns only that sum by SecAgg+ (Bonawitz et al., CCS 2017, with the sparse neighbour
graph of Bell et al., CCS 2020), in three exchanges after the set-up's keys:
- set-up: each client draws two X25519 key pairs (one for masks, one for the shares it sends) and a
  32-byte self-mask seed, and sends the two public keys;
- "shares": the server places the clients on a ring in random order; each client's neighbours are
  the h nearest on either side (all clients when the round is small; `plan`). Each client splits
  its seed and its mask private key into Shamir shares, t of them rebuild either (over the prime
  field of 2^521 - 1), one for each neighbour and one for itself, and seals each holder's pair
  with AES-256-GCM under a key it agrees with that holder (X25519, HKDF-SHA256), so the server only
  relays them; it also sends a SHA-256 commitment to every share, to tell a holder's false share;
- "masked": each client sends its fixed-point vector plus the expansion of its seed plus the
  masks it shares with each neighbour that sent its shares (X25519, HKDF-SHA256 bound to the run
  and the pair, AES-256-CTR into 64-bit words; + with higher ids, - with lower), modulo 2^64;
- "unmask": the server tells each client that sent its vector how many did, and asks it for the
  shares it holds: of the seed of every neighbour that sent its vector, of the mask key of every
  neighbour that did not, never both for one client. A client refuses when fewer than M sent their
  vectors (its noise share assumes M), when asked for its own mask key, and when asked a second,
  different question. The server checks each share against its commitment, rebuilds the seeds and
  the dropped clients' mask keys from t shares each, and removes the seeds' expansions and the
  dropped clients' masks: what is left is the exact sum of the survivors' vectors.
A client that fails after the key exchange costs nothing but its vector; one whose vector comes
late is still hidden by its seed's mask. Fewer than M vectors, or a secret that fewer than t
holders answer for, stops the secure sum with a SecAggError (the run then stops before any
release).

Fixed point: values are rounded to multiples of 2^-FRACTION_BITS and held as two's-complement 64-bit
integers; the sums the clients send are at most about 2^17 in clip units, far inside the 2^39 range.
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from prismfl.errors import PrismError

FRACTION_BITS = 24
LIMIT = 2.0**38  # largest magnitude encoded (clip units); the sums stay far below it
KEY_BYTES = 32
SEED_BYTES = 32  # a self-mask seed
CONTEXT_BYTES = 32  # what binds every mask and share to one run and one set of participants
PRIME = 2**521 - 1  # Shamir's field: a Mersenne prime, above every 32-byte secret
SHARE_BYTES = 66  # a field element, big-endian
SEALED_BYTES = 2 * SHARE_BYTES + 16  # a holder's two shares under AES-GCM (with its 16-byte tag)
COMMIT_BYTES = 2 * 32  # SHA-256 of each of the two shares
MAX_ID = 65_535  # client ids (partition.num_clients is at most 65,535)
STAGES = ("shares", "masked", "unmask")
SECRETS = ("private", "share_private", "seed", "answered")  # a client's saved state: bytes as uint8 tensors
SEED, KEY = 0, 1  # what an unmask request asks a holder for: a share of the owner's seed or of its mask key
# the neighbour graph (`plan`): the chance that the honest survivors split into groups whose sums the
# server would learn apart, and that some secret cannot be rebuilt, when the dropouts allowed happen at
# random; and the fewest neighbours on either side
SPLIT_ODDS, FAIL_ODDS, MIN_HALF_DEGREE = 2.0**-40, 2.0**-20, 2


class SecAggError(PrismError):
    """Secure aggregation cannot go on (a bad key, a message of the wrong size, too few clients left)."""


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


# ---------------------------------------------------------------- how many may drop; the graph; the threshold


def min_survivors(num_clients: int, dropouts: float) -> int:
    """M: the fewest of the `num_clients` clients whose vectors the server may unmask, when the fraction
    `dropouts` (privacy.dropouts) of them may drop out; each client's noise share is sized for M."""
    return num_clients - math.floor(round(dropouts * num_clients, 9))


def noise_share(num_clients: int, dropouts: float, colluders: int) -> float:
    """What each client adds of the one-release noise's standard deviation: 1 / sqrt(M - c), so that any
    M clients' noise, less the c colluders', adds up to the one release's."""
    return 1 / math.sqrt(min_survivors(num_clients, dropouts) - colluders)


@dataclass(frozen=True)
class Plan:
    """The secure sum of `participants` clients: each has `half_degree` neighbours on either side of
    the ring (None: every other participant), `threshold` of the shares of a secret rebuild it, and
    at least `min_survivors` vectors must come for the server to unmask their sum."""

    participants: int
    half_degree: int | None
    threshold: int
    min_survivors: int

    @property
    def holders(self) -> int:
        """How many hold a share of each client's secrets (its neighbours and itself)."""
        return self.participants if self.half_degree is None else 2 * self.half_degree + 1


def binomial_tail(n: int, p: float, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, p) (in logs: n may be large)."""
    if k <= 0:
        return 1.0
    if p <= 0 or k > n:
        return 0.0
    if p >= 1:
        return 1.0
    log_term = lambda i: (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)  # noqa: E731
                          + i * math.log(p) + (n - i) * math.log1p(-p))  # fmt: skip
    return min(1.0, sum(math.exp(log_term(i)) for i in range(k, n + 1)))


def plan(participants: int, num_clients: int, dropouts: float, colluders: int) -> Plan:
    """The neighbour graph and threshold of a secure sum (SecAgg+, Bell et al. 2020), for `participants`
    clients of a federation of `num_clients`, of which the fraction `dropouts` may drop out and
    `colluders` may side with the server. With L = participants - M allowed to drop:

    - half degree h: the smallest (>= MIN_HALF_DEGREE) for which the honest survivors stay connected on
      the ring (every sum the server can form is the whole sum) but with odds below SPLIT_ODDS when the
      L dropped and the c colluders lie at random: they split it only where two runs of h of them
      lie side by side, (n q^h)^2 with q = (L + c) / n;
    - threshold t: the largest for which a dropped client's 2h neighbours keep t survivors but with odds
      below FAIL_ODDS (n x P(Binomial(2h, L / n) > 2h - t)); at least c + 1 (c colluding holders learn
      nothing) and 2, else h grows;
    - every participant a neighbour once 2h + 1 >= n, with t = min(M, max(c + 1, floor(n / 2) + 1)).
    Degree and threshold grow as log n, so does each client's cost."""
    n, c = participants, colluders
    m = min_survivors(num_clients, dropouts)
    if n < max(m, 1):
        raise SecAggError(f"{n} of the {num_clients} clients take part, fewer than the {m} whose vectors the "
                          f"secure sum needs (privacy.dropouts = {dropouts:g})")  # fmt: skip
    lost, removed = (n - m) / n, min(1.0, (n - m + c) / n)
    h = MIN_HALF_DEGREE
    while 2 * h + 1 < n:
        if (n * removed**h) ** 2 <= SPLIT_ODDS:
            t = next((t for t in range(2 * h, 0, -1) if n * binomial_tail(2 * h, lost, 2 * h - t + 1) <= FAIL_ODDS), 0)
            if t >= max(c + 1, 2):
                return Plan(n, h, t, m)
        h += 1
    return Plan(n, None, min(m, max(c + 1, n // 2 + 1)), m)


def ring(ids: list[int], half_degree: int | None, rng: random.Random) -> dict[int, list[int]]:
    """Each participant's neighbours (sorted, itself excluded): the `half_degree` nearest on either side
    of a ring in an order `rng` draws; every other participant where `half_degree` is None."""
    if half_degree is None:
        return {k: [j for j in ids if j != k] for k in ids}
    order = list(ids)
    rng.shuffle(order)
    n = len(order)
    return {k: sorted({order[(i + d) % n] for d in range(-half_degree, half_degree + 1)} - {k})
            for i, k in enumerate(order)}  # fmt: skip


# ---------------------------------------------------------------- Shamir's secret sharing modulo PRIME


def split(secret: int, threshold: int, xs: list[int], coefficients: list[int]) -> list[int]:
    """The shares f(x) for x in `xs` (distinct, non-zero) of f(x) = secret + a_1 x + ... + a_{t-1} x^{t-1}
    modulo PRIME, where the a_i are the t - 1 `coefficients` (uniform in the field: any t - 1 shares
    then say nothing of the secret)."""
    if len(coefficients) != threshold - 1 or not 0 <= secret < PRIME:
        raise ValueError(f"a threshold of {threshold} needs {threshold - 1} coefficients and a secret in the field")
    poly = [secret, *coefficients]
    out = []
    for x in xs:
        y = 0
        for a in reversed(poly):  # Horner
            y = (y * x + a) % PRIME
        out.append(y)
    return out


def combine(points: dict[int, int]) -> int:
    """f(0) from points {x: f(x)} of a polynomial of degree below len(points) (Lagrange), modulo PRIME."""
    total = 0
    for xi, yi in points.items():
        num = den = 1
        for xj in points:
            if xj != xi:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


# ---------------------------------------------------------------- keys, masks and sealed shares


def key_pair(private: bytes | None = None):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(private) if private is not None else X25519PrivateKey.generate()


def raw(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(key, "private_bytes"):
        return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())  # fmt: skip
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_public_key(key: bytes, what: str = "a secure-aggregation public key") -> None:
    """A peer's public key that every client can use: 32 bytes, not of small order (an exchange with it
    gives a non-zero secret); a SecAggError otherwise, before anyone depends on it."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    agree(X25519PrivateKey.generate(), key, what)


def agree(private, peer_key: bytes, what: str) -> bytes:
    """The X25519 secret of `private` and a peer's public key; a SecAggError for a key of the wrong size
    or of small order (an all-zero secret)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    if not (isinstance(peer_key, bytes) and len(peer_key) == KEY_BYTES):
        raise SecAggError(f"{what} is not {KEY_BYTES} bytes")
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_key))
    except ValueError as exc:
        raise SecAggError(f"{what} is unusable: {exc}") from None


def derive(secret: bytes, info: bytes) -> bytes:
    """A 32-byte key from a secret, for one purpose (`info`): HKDF-SHA256."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"prismfl-secagg-v2:" + info).derive(secret)


def expand(key: bytes, words: int) -> np.ndarray:
    """`words` pseudo-random 64-bit words: AES-256-CTR over zeros."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(8 * words))
    return np.frombuffer(stream, dtype=np.uint64)


def mask(private, my_id: int, peer_id: int, peer_key: bytes, context: bytes, words: int) -> np.ndarray:
    """The mask pair (my_id, peer_id) shares: X25519, then HKDF-SHA256 bound to the run `context` and
    the pair, then AES-256-CTR. Both ends (and the server, from a dropped client's rebuilt key) compute
    the same words."""
    secret = agree(private, peer_key, f"client {peer_id}'s public key")
    low, high = sorted((my_id, peer_id))
    return expand(derive(secret, b"mask:" + context + f":{low}:{high}".encode()), words)


def self_mask(seed: bytes, my_id: int, context: bytes, words: int) -> np.ndarray:
    """The mask a client's own seed expands to (the server removes it once t holders give the seed)."""
    return expand(derive(seed, b"self:" + context + f":{my_id}".encode()), words)


def sealer(private, peer_key: bytes, sender: int, receiver: int, context: bytes, what: str):
    """(AES-256-GCM, associated data) for the shares `sender` sends `receiver`: the key both derive from
    their share keys' X25519 secret, bound to the run and to the direction. One message per key, so the
    nonce is constant (and a sealed pair is the same bytes whenever it is sealed again)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    label = b"shares:" + context + f":{sender}:{receiver}".encode()
    return AESGCM(derive(agree(private, peer_key, what), label)), label


def commitment(context: bytes, owner: int, holder: int, kind: int, share: bytes) -> bytes:
    """SHA-256 of one share (what the server checks a holder's answer against)."""
    label = f":{owner}:{holder}:{kind}:".encode()
    return hashlib.sha256(b"prismfl-secagg-v2:share:" + context + label + share).digest()


def coefficients(secret: bytes, kind: int, context: bytes, count: int) -> list[int]:
    """The Shamir coefficients of a secret: uniform field elements drawn from the secret itself (80 bytes
    each, reduced modulo PRIME), so that asking for the shares again gives the same shares."""
    stream = expand(derive(secret, b"shamir:" + context + f":{kind}".encode()), 10 * count).tobytes()
    return [int.from_bytes(stream[80 * i : 80 * (i + 1)], "big") % PRIME for i in range(count)]


def context_of(table_hash: int, participants) -> bytes:
    """What binds the masks and shares to one run and one set of participants (a replayed message from
    another run or another set does not cancel): 32 bytes, whatever the number of participants."""
    text = f"{table_hash:016x}:{','.join(str(k) for k in sorted(participants))}"
    return hashlib.sha256(b"prismfl-secagg-v2:context:" + text.encode()).digest()


def check_clip(clip) -> list[float]:
    """Clip bounds that came over the network: a list of positive finite numbers (or empty)."""
    if not (isinstance(clip, list) and len(clip) <= 1000
            and all(isinstance(c, int | float) and math.isfinite(c) and c > 0 for c in clip)):  # fmt: skip
        raise SecAggError("secure-aggregation clip bounds are not a list of positive numbers")
    return [float(c) for c in clip]


# ---------------------------------------------------------------- the fields of a message (either way)


def size_of(message: dict) -> int:
    """A message's bytes as counted here: its byte strings' lengths, 8 for an integer, of its fields
    and of their lists' items."""
    items = [x for v in message.values() for x in (v if isinstance(v, list) else [v])]
    return sum(len(x) if isinstance(x, bytes) else 8 if isinstance(x, int) else 0 for x in items)


def field(message, key: str, what: str):
    if not isinstance(message, dict) or key not in message:
        raise SecAggError(f"{what} lacks {key!r}")
    return message[key]


def integer(value, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise SecAggError(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def id_list(value, what: str) -> list[int]:
    """Client ids in increasing order (so each at most once), each in [0, MAX_ID]."""
    if not (isinstance(value, list) and len(value) <= MAX_ID + 1 and all(type(k) is int for k in value)
            and all(0 <= k <= MAX_ID for k in value) and all(a < b for a, b in zip(value, value[1:]))):  # fmt: skip
        raise SecAggError(f"{what} must be increasing client ids in [0, {MAX_ID}]")
    return value


def blob_list(value, what: str, count: int, size: int, empty: bool = False) -> list[bytes]:
    """`count` byte strings of `size` bytes each (or empty ones, where `empty` allows)."""
    if not (isinstance(value, list) and len(value) == count
            and all(isinstance(b, bytes) and (len(b) == size or (empty and not b)) for b in value)):  # fmt: skip
        raise SecAggError(f"{what} must be {count} byte strings of {size} bytes")
    return value


def blob(value, what: str, size: int) -> bytes:
    if not (isinstance(value, bytes) and len(value) == size):
        raise SecAggError(f"{what} must be {size:,} bytes")
    return value


# ---------------------------------------------------------------- a client's side


class SecAggClient:
    """A client's side: its fixed-point noisy vector, its two X25519 key pairs and its self-mask seed
    (none of them leaves it but as shares), M (the fewest vectors it lets the server unmask a sum of:
    its noise share assumes M), c (how many holders of its shares may collude: the threshold must be
    higher) and the digest of the one unmask request it answered (it answers no other)."""

    def __init__(self, words: np.ndarray, layout: list[list[int]], *, min_survivors: int, colluders: int = 0,
                 clip: list[float] | None = None, private: bytes | None = None, share_private: bytes | None = None,
                 seed: bytes | None = None, answered: bytes = b""):  # fmt: skip
        self.words, self.layout, self.clip = words, layout, clip or []
        self.min_survivors, self.colluders, self.answered = min_survivors, colluders, answered
        self.key, self.share_key = key_pair(private), key_pair(share_private)
        self.seed = seed if seed is not None else secrets.token_bytes(SEED_BYTES)

    @classmethod
    def of_release(cls, shared: dict, clip: list[float] | None = None, *, min_survivors: int,
                   colluders: int = 0) -> SecAggClient:  # fmt: skip
        vector, layout = flatten(shared)
        return cls(encode(vector), layout, min_survivors=min_survivors, colluders=colluders, clip=clip)

    def public(self) -> dict:
        """What goes to the server at set-up: the two public keys, the vector's layout and the public clip
        bounds (the scale of its layers, for privacy.shrink)."""
        return {"public_key": raw(self.key.public_key()), "share_key": raw(self.share_key.public_key()),
                "layout": self.layout, "clip": self.clip}  # fmt: skip

    def answer(self, my_id: int, stage: str, request: dict) -> dict:
        """Its reply to the server's request of one stage (module doc); a SecAggError for a request it
        must not or cannot answer."""
        if stage not in STAGES:
            raise SecAggError(f"no secure-aggregation stage {stage!r}")
        return getattr(self, stage)(my_id, request)

    def shares(self, my_id: int, request: dict) -> dict:
        """Its seed's and its mask key's shares, one pair for each holder (its neighbours and itself), each
        sealed for its holder, and the commitments to them."""
        what = "the shares request"
        context = blob(field(request, "context", what), "context", CONTEXT_BYTES)
        holders = id_list(field(request, "holders", what), "holders")
        share_keys = blob_list(field(request, "share-keys", what), "share-keys", len(holders), KEY_BYTES)
        if my_id not in holders or share_keys[holders.index(my_id)] != raw(self.share_key.public_key()):
            raise SecAggError(f"the holders of client {my_id}'s shares do not include it with its own key")
        t = integer(field(request, "threshold", what), "threshold", self.colluders + 1, len(holders))
        xs = [h + 1 for h in holders]
        pairs = [[y.to_bytes(SHARE_BYTES, "big") for y in split(int.from_bytes(secret, "big"), t, xs,
                                                                coefficients(secret, kind, context, t - 1))]
                 for kind, secret in ((SEED, self.seed), (KEY, raw(self.key)))]  # fmt: skip
        sealed, commits = [], []
        for i, (holder, key) in enumerate(zip(holders, share_keys)):
            aead, label = sealer(self.share_key, key, my_id, holder, context, f"client {holder}'s share key")
            sealed.append(aead.encrypt(bytes(12), pairs[SEED][i] + pairs[KEY][i], label))
            commits.append(b"".join(commitment(context, my_id, holder, kind, pairs[kind][i]) for kind in (SEED, KEY)))
        return {"sealed": sealed, "commitments": commits}

    def masked(self, my_id: int, request: dict) -> dict:
        """Its vector plus its seed's mask plus the masks it shares with each neighbour (+ with higher ids,
        - with lower), modulo 2^64."""
        what = "the masked-vector request"
        context = blob(field(request, "context", what), "context", CONTEXT_BYTES)
        peers = id_list(field(request, "peers", what), "peers")
        keys = blob_list(field(request, "mask-keys", what), "mask-keys", len(peers), KEY_BYTES)
        if my_id in peers:
            raise SecAggError(f"client {my_id} is among its own peers")
        out = self.words + self_mask(self.seed, my_id, context, len(self.words))  # uint64: wraps modulo 2^64
        for peer, key in zip(peers, keys):
            m = mask(self.key, my_id, peer, key, context, len(out))
            out = out + m if my_id < peer else out - m
        return {"masked": out.tobytes()}

    def unmask(self, my_id: int, request: dict) -> dict:
        """The shares it holds that the server asks for: of each owner's seed (the owner sent its vector)
        or mask key (it did not); an empty share where an owner's sealed pair does not open."""
        what = "the unmask request"
        context = blob(field(request, "context", what), "context", CONTEXT_BYTES)
        survivors = integer(field(request, "survivors", what), "survivors", 0, MAX_ID + 1)
        if survivors < self.min_survivors:
            raise SecAggError(f"refused: the server would unmask the sum of {survivors} clients' vectors, fewer "
                              f"than the {self.min_survivors} this client's share of the noise assumes")  # fmt: skip
        owners = id_list(field(request, "owners", what), "owners")
        kinds = field(request, "kinds", what)
        if not (isinstance(kinds, list) and len(kinds) == len(owners) and all(k in (SEED, KEY) and type(k) is int
                                                                              for k in kinds)):  # fmt: skip
            raise SecAggError(f"kinds must be {len(owners)} integers, {SEED} (a seed) or {KEY} (a mask key)")
        keys = blob_list(field(request, "share-keys", what), "share-keys", len(owners), KEY_BYTES)
        sealed = blob_list(field(request, "sealed", what), "sealed", len(owners), SEALED_BYTES)
        if my_id in owners and kinds[owners.index(my_id)] == KEY:
            raise SecAggError(f"refused: client {my_id} is asked for a share of its own mask key")
        digest = hashlib.sha256(context + repr((owners, kinds)).encode()).digest()
        if self.answered and self.answered != digest:
            raise SecAggError("refused: this client answered another unmask request already (two answers could "
                              "give the server both secrets of one client)")  # fmt: skip
        from cryptography.exceptions import InvalidTag

        out = []
        for owner, kind, key, box in zip(owners, kinds, keys, sealed):
            aead, label = sealer(self.share_key, key, owner, my_id, context, f"client {owner}'s share key")
            try:
                pair = aead.decrypt(bytes(12), box, label)
            except InvalidTag:  # not sealed for this client, or altered
                out.append(b"")
                continue
            out.append(pair[kind * SHARE_BYTES : (kind + 1) * SHARE_BYTES])
        self.answered = digest
        return {"shares": out}

    def to_tree(self) -> dict:
        """For the client's own saved state between messages (Flower's Context.state)."""
        secret = dict(zip(SECRETS, (raw(self.key), raw(self.share_key), self.seed, self.answered)))
        return {"words": torch.from_numpy(self.words.view(np.int64).copy()), "layout": self.layout,
                "clip": self.clip, "min_survivors": self.min_survivors, "colluders": self.colluders,
                **{key: torch.tensor(list(value), dtype=torch.uint8) for key, value in secret.items()}}  # fmt: skip

    @classmethod
    def from_tree(cls, tree: dict) -> SecAggClient:
        try:
            words, layout = tree["words"], tree["layout"]
            private, share_private, seed, answered = (bytes(tree[key].numpy().tobytes()) for key in SECRETS)
            clip = check_clip(tree.get("clip", []))
            m = integer(tree["min_survivors"], "min_survivors", 1, MAX_ID + 1)
            c = integer(tree["colluders"], "colluders", 0, m - 1)
            sizes = [len(private), len(share_private), len(seed), len(answered)]
            if check_layout(layout) != len(words) or words.dtype != torch.int64 or sizes[:3] != [KEY_BYTES] * 3 \
                    or sizes[3] not in (0, 32):  # fmt: skip
                raise SecAggError("inconsistent")
        except (KeyError, TypeError, AttributeError, SecAggError) as exc:
            raise SecAggError(f"the client's secure-aggregation state is not usable: {exc}") from None
        return cls(words.numpy().view(np.uint64).copy(), layout, min_survivors=m, colluders=c, clip=clip,
                   private=private, share_private=share_private, seed=seed, answered=answered)  # fmt: skip


# ---------------------------------------------------------------- the server's side


class SecAggServer:
    """The server's side of one secure sum: for each stage in STAGES, `requests(stage)` gives every
    client still in its message, and `take(stage, replies, failures)` checks what came back (every
    field, type and size, before use): a client that does not answer, refuses or answers amiss drops
    out of the sum, with its reason in `dropped`. `result()` is the sum of the survivors' vectors.

    `public`: each participant's set-up keys ({"public_key", "share_key"}); `rng` places them on the
    ring (default: the operating system's randomness)."""

    def __init__(self, public: dict[int, dict], layout: list[list[int]], *, num_clients: int, dropouts: float,
                 colluders: int, table_hash: int, rng: random.Random | None = None):  # fmt: skip
        self.ids = id_list(sorted(public), "participants")
        self.mask_keys = {k: public[k]["public_key"] for k in self.ids}
        self.share_keys = {k: public[k]["share_key"] for k in self.ids}
        self.layout, self.size = layout, check_layout(layout)
        self.plan = plan(len(self.ids), num_clients, dropouts, colluders)
        self.neighbours = ring(self.ids, self.plan.half_degree, rng or random.SystemRandom())
        self.holders = {k: sorted([*self.neighbours[k], k]) for k in self.ids}  # who holds k's shares
        self.slot = {k: {h: i for i, h in enumerate(hs)} for k, hs in self.holders.items()}  # and in what order
        self.context = context_of(table_hash, self.ids)
        # client -> why it took no further part (one whose unmask reply failed: its shares are not used,
        # its vector stays in the sum)
        self.dropped: dict[int, str] = {}
        self.sent: dict[int, tuple[list[bytes], list[bytes]]] = {}  # "shares": each sender's sealed pairs, commitments
        self.survivors: list[int] = []  # "masked": the clients whose vectors are in the sum
        self.total = np.zeros(self.size, dtype=np.uint64)
        self.traffic = {"up": 0, "down": 0}  # the bytes of the requests sent and of the good replies
        self.stage = 0  # the next stage to run
        self.done = False

    def requests(self, stage: str) -> dict[int, dict]:
        if self.stage >= len(STAGES) or stage != STAGES[self.stage]:
            raise SecAggError(f"the secure sum's next stage is not {stage!r}")
        if stage == "shares":
            return {k: {"context": self.context, "holders": self.holders[k], "threshold": self.plan.threshold,
                        "share-keys": [self.share_keys[h] for h in self.holders[k]]} for k in self.ids}  # fmt: skip
        if stage == "masked":
            out = {}
            for k in self.sent:
                peers = [j for j in self.neighbours[k] if j in self.sent]
                out[k] = {"context": self.context, "peers": peers, "mask-keys": [self.mask_keys[j] for j in peers]}
            return out
        out, alive = {}, set(self.survivors)
        for k in self.survivors:
            owners = [j for j in self.holders[k] if j in self.sent]
            out[k] = {"context": self.context, "survivors": len(self.survivors), "owners": owners,
                      "kinds": [SEED if j in alive else KEY for j in owners],
                      "share-keys": [self.share_keys[j] for j in owners],
                      "sealed": [self.sent[j][0][self.slot[j][k]] for j in owners]}  # fmt: skip
        return out

    def take(self, stage: str, replies: dict[int, dict], failures: dict[int, str] | None = None) -> None:
        """The replies to `requests(stage)` ({client: reply}), and why the others sent none."""
        asked = self.requests(stage)
        self.stage += 1
        good = {}
        for k in asked:
            try:
                if k not in replies:
                    raise SecAggError((failures or {}).get(k, "no reply"))
                good[k] = getattr(self, f"_check_{stage}")(k, asked[k], replies[k])
            except SecAggError as exc:
                self.dropped[k] = f"{stage}: {exc}"
        self.traffic["down"] += sum(size_of(r) for r in asked.values())
        self.traffic["up"] += sum(size_of(replies[k]) for k in good)
        if stage == "shares":
            self.sent = good
        elif stage == "masked":
            self.survivors = sorted(good)
            for k in self.survivors:
                self.total += np.frombuffer(good[k], dtype=np.uint64)  # wraps modulo 2^64
            if len(self.survivors) < self.plan.min_survivors:
                raise SecAggError(f"{len(self.survivors)} of {len(self.ids)} clients sent their masked vector, "
                                  f"fewer than the {self.plan.min_survivors} each client's share of the noise "
                                  "assumes (privacy.dropouts), so their sum stays masked")  # fmt: skip
        else:
            self._unmask(good)

    def _check_shares(self, k: int, asked: dict, reply: dict) -> tuple[list[bytes], list[bytes]]:
        n = len(asked["holders"])
        sealed = blob_list(field(reply, "sealed", "the reply"), "sealed", n, SEALED_BYTES)
        commits = blob_list(field(reply, "commitments", "the reply"), "commitments", n, COMMIT_BYTES)
        return sealed, commits

    def _check_masked(self, k: int, asked: dict, reply: dict) -> bytes:
        return blob(field(reply, "masked", "the reply"), "the masked vector", 8 * self.size)

    def _check_unmask(self, k: int, asked: dict, reply: dict) -> dict[int, int]:
        """The shares holder k gave, by owner, each checked against its owner's commitment."""
        owners, kinds = asked["owners"], asked["kinds"]
        shares = blob_list(field(reply, "shares", "the reply"), "shares", len(owners), SHARE_BYTES, empty=True)
        out = {}
        for owner, kind, share in zip(owners, kinds, shares):
            if not share:
                continue  # its owner's sealed pair did not open for it
            committed = self.sent[owner][1][self.slot[owner][k]][32 * kind : 32 * (kind + 1)]
            if commitment(self.context, owner, k, kind, share) != committed:
                raise SecAggError(f"its share of client {owner}'s {'seed' if kind == SEED else 'mask key'} is not "
                                  "the one client sent it")  # fmt: skip
            out[owner] = int.from_bytes(share, "big")
        return out

    def _unmask(self, given: dict[int, dict[int, int]]) -> None:
        """Rebuild every survivor's seed and every dropped client's mask key from t shares, and take their
        masks off the sum."""
        t, alive = self.plan.threshold, set(self.survivors)
        points: dict[int, dict[int, int]] = {owner: {} for owner in self.sent}  # owner -> {holder + 1: share}
        for k, shares in sorted(given.items()):
            for owner, share in shares.items():
                points[owner][k + 1] = share
        for owner in sorted(self.sent):
            kind = "seed" if owner in alive else "mask key"
            if len(points[owner]) < t:
                raise SecAggError(f"client {owner}'s {kind} cannot be rebuilt: {len(points[owner])} of its holders "
                                  f"gave a share, {t} are needed")  # fmt: skip
            secret = combine(dict(sorted(points[owner].items())[:t]))
            if secret >> (8 * KEY_BYTES):
                raise SecAggError(f"client {owner}'s {kind} rebuilt from its shares is not {KEY_BYTES} bytes")
            secret_bytes = secret.to_bytes(KEY_BYTES, "big")
            if owner in alive:
                self.total -= self_mask(secret_bytes, owner, self.context, self.size)
                continue
            private = key_pair(secret_bytes)
            if raw(private.public_key()) != self.mask_keys[owner]:
                raise SecAggError(f"client {owner}'s mask key rebuilt from its shares does not match its public key")
            for peer in self.neighbours[owner]:
                if peer in alive:  # the peer added +m below the owner's id, -m above it: undo
                    m = mask(private, owner, peer, self.mask_keys[peer], self.context, self.size)
                    self.total = self.total - m if peer < owner else self.total + m
        self.done = True

    def result(self) -> dict:
        """The sum of the survivors' vectors, decoded into the summed noisy statistics."""
        if not self.done:
            raise SecAggError("the secure sum is not unmasked yet")
        return unflatten(decode(self.total), self.layout)
