"""What a SuperNode's replies may hold: each field's type, range and size, checked before use.

A node is not trusted to be well formed. The server reads a reply only through these checks; any
failure is a NodeError naming the field, and the server drops that node (one log line) and goes on
with the others. Sizes are checked before anything is parsed: a JSON text is bounded in length and
in nesting depth before `json.loads` sees it, a byte string in length before it is copied.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from prismfl import safestate, schema
from prismfl.errors import PrismError
from prismfl.flower.payload import LINK_KEY_BYTES, STATE, from_array

MAX_TEXT = 1 << 16  # characters of one JSON or text field
MAX_DEPTH = 8  # nesting of a JSON field
MAX_COUNT = 1 << 40  # one class count (images)


class NodeError(PrismError):
    """A reply that is not what an honest node of this run sends: the node is dropped."""


def integer(value, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise NodeError(f"{what} must be an integer in [{lo}, {hi}], got {_show(value)}")
    return value


def text(value, what: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise NodeError(f"{what} must be a text of at most {limit:,} characters, got {_show(value)}")
    return value


def json_field(value, what: str, limit: int = MAX_TEXT):
    """A JSON text of bounded length and nesting depth (checked on the characters before parsing)."""
    raw = text(value, what, limit)
    depth = deepest = 0
    in_string = escaped = False
    for ch in raw:  # brackets outside strings: the depth json.loads would recurse to
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise NodeError(f"{what} nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise NodeError(f"{what} is not JSON: {exc}") from None


def finite(x, lo: float = -math.inf, hi: float = math.inf) -> bool:
    """x is an int (not a bool) or float, finite, in [lo, hi]; integers beyond 2^53 are refused unread
    (math.isfinite of a 400-digit integer raises OverflowError)."""
    if type(x) is int:
        return abs(x) <= 2**53 and lo <= x <= hi
    return type(x) is float and math.isfinite(x) and lo <= x <= hi


def number_list(value, what: str, lengths: set[int], lo: float, hi: float, integral: bool = False) -> list:
    """A list of numbers (ints where `integral`) of one of `lengths`, each finite in [lo, hi]."""
    kinds = (int,) if integral else (int, float)
    if not isinstance(value, list) or len(value) not in lengths:
        sizes = " or ".join(map(str, sorted(lengths)))
        raise NodeError(f"{what} must be a list of {sizes} numbers, got {_show(value)}")
    for x in value:
        if type(x) not in kinds or not finite(x, lo, hi):
            kind = "an integer" if integral else "a number"
            raise NodeError(f"{what} holds {_show(x)}, not {kind} in [{lo:g}, {hi:g}]")
    return value


def raw_bytes(value, what: str, size: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise NodeError(f"{what} must be {size} bytes, got {_show(value)}")
    return value


def payload(content, key: str, stype: str, what: str) -> bytes:
    """The one array of an ArrayRecord `key` of a reply, as bytes of the expected stype."""
    try:
        record = content[key]
        if list(record.keys()) != ["000"]:
            raise NodeError(f"{what} must be one array, got keys {list(record.keys())[:4]}")
        return from_array(record["000"], stype)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise NodeError(f"{what}: {type(exc).__name__}: {exc}") from None


def _show(value) -> str:
    """A short description of a value that may be huge (its repr is taken of a bounded part only)."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlist, short.maxlong = 60, 60, 6, 40
    return f"{type(value).__name__} {short.repr(value)}"


@dataclass
class SetupReply:
    """One node's checked answer to the setup message."""

    partition: int
    class_counts: list[int]  # its row of the class table ([] when it reported none)
    source: str
    model_info: dict  # {"feature_net": dict, "privacy": dict | None}
    link_key: bytes  # the key of the tags on its train messages (payload.downlink_tag)
    statistics_class_counts: list[float] | None = None
    warm_start: bytes | None = None  # partition 0 of a warm-started run: a wire state message (decoded later)
    warm_info: dict | None = None
    secagg: dict | None = None  # privacy.secagg: public_key, share_key, layout, clip
    shrink_target: dict | None = None
    shared: dict | None = None  # privacy.pool: its release's noisy sums (a safestate tree)
    statistics: object | None = None  # a pooled warm start: its (released) feature statistics, a FeatureStats
    statistics_bytes: int = 0  # and their size on the wire (the payload)


WARM_KEYS = ("steps", "images", "loss", "seconds")


def setup_reply(content, *, clients: int, num_weights: int, table_hash: int, num_classes: int, codes: int,
                secagg: bool, key_bytes: int, private: bool = False, privacy_schema=None) -> SetupReply:  # fmt: skip
    """Check a setup reply against the run: partition id, model identity, counts, and the optional
    parts (warm start, secure-aggregation key, shared sums); a NodeError for the first bad field."""
    from prismfl import secagg as sa

    try:
        info = dict(content["prismfl"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise NodeError(f"the reply has no prismfl record ({type(exc).__name__})") from None
    for key in ("partition-id", "num-weights", "table-hash", "class-counts", "source", "model-info"):
        if key not in info:
            raise NodeError(f"the reply lacks {key!r}")
    pid = integer(info["partition-id"], "partition-id", 0, clients - 1)
    if info["num-weights"] != num_weights or info["table-hash"] != f"{table_hash:016x}":
        raise NodeError(
            f"it built another model ({_show(info['num-weights'])} weights, layer table "
            f"{_show(info['table-hash'])}): are server and clients running one prismfl version?"
        )
    widths = {0, 1, num_classes} if private else {0, num_classes}  # (1: a private release's one noisy total)
    row = number_list(info["class-counts"], "class-counts", widths, 0, MAX_COUNT, integral=True)
    model_info = json_field(info["model-info"], "model-info")
    if not (isinstance(model_info, dict) and isinstance(model_info.get("feature_net"), dict)
            and (model_info.get("privacy") is None or isinstance(model_info["privacy"], dict))):  # fmt: skip
        raise NodeError("model-info must be {'feature_net': {...}, 'privacy': {...} or null}")
    try:  # the release's parameters: null without privacy, else calibrated for the run's (epsilon, delta)
        schema.check(privacy_schema or schema.Null(), model_info.get("privacy"), "setup reply", "model-info.privacy")
    except safestate.StateError as exc:
        raise NodeError(str(exc)) from None
    link_key = raw_bytes(info.get("link-key"), "link-key", LINK_KEY_BYTES)
    reply = SetupReply(pid, row, text(info["source"], "source", 1000), model_info, link_key)
    if "statistics-class-counts" in info:
        counts = number_list(info["statistics-class-counts"], "statistics-class-counts", {codes}, -MAX_COUNT,
                             MAX_COUNT)  # fmt: skip
        per_class = [sum(counts[c * (codes // num_classes) : (c + 1) * (codes // num_classes)])
                     for c in range(num_classes)] if codes % num_classes == 0 else None  # fmt: skip
        if not private and per_class != [float(x) for x in row]:  # exact counts: the row's, class by class
            raise NodeError("statistics-class-counts do not add up to its class-counts row")
        reply.statistics_class_counts = counts
    if "warm-start-info" in info:
        got = json_field(info["warm-start-info"], "warm-start-info", 4096)
        if isinstance(got, dict):
            reply.warm_info = {key: v for key, v in got.items() if key in WARM_KEYS and finite(v)}
    if "warm-start" in content:
        reply.warm_start = payload(content, "warm-start", "prismfl/wire", "warm-start scores")
    if secagg:
        key = raw_bytes(info.get("secagg-public-key"), "secagg-public-key", key_bytes)
        share_key = raw_bytes(info.get("secagg-share-key"), "secagg-share-key", key_bytes)
        layout = json_field(info.get("secagg-layout"), "secagg-layout")
        try:
            sa.check_public_key(key)  # (a small-order key would make every other client's masking fail)
            sa.check_public_key(share_key, "a secure-aggregation share key")
            sa.check_layout(layout)
            clip = json_field(info.get("secagg-clip"), "secagg-clip")
            if not (isinstance(clip, list) and all(finite(c) for c in clip)):
                raise NodeError("secagg-clip must be a list of finite numbers")
            clip = sa.check_clip(clip)
        except sa.SecAggError as exc:
            raise NodeError(str(exc)) from None
        reply.secagg = {"public_key": key, "share_key": share_key, "layout": layout, "clip": clip}
    if "shrink-target" in content:
        blob = payload(content, "shrink-target", STATE, "shrinkage target")
        reply.shrink_target = _tree(blob, "shrinkage target")
    if "shared" in content:
        reply.shared = _tree(payload(content, "shared", STATE, "shared statistics"), "shared sums")
    if "statistics" in content:
        blob = payload(content, "statistics", STATE, "statistics")
        reply.statistics = statistics(blob, codes, None if private else reply.statistics_class_counts)
        reply.statistics_bytes = len(blob)
    return reply


def moments_reply(content, *, clients: int, num_classes: int, d: int, private: bool = False) -> tuple[int, dict, int]:
    """A node's answer to the moments message (model.modes without public images): (its partition, its
    moment sums as float64 arrays (fl/client.py moments_of_message), their size on the wire (the payload));
    a NodeError for the first bad field."""
    from prismfl.fl.client import moments_of_message

    try:
        pid = integer(dict(content["prismfl"])["partition-id"], "partition-id", 0, clients - 1)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise NodeError(f"the moments reply has no partition-id ({type(exc).__name__})") from None
    blob = payload(content, "moments", STATE, "moment sums")
    try:
        return pid, moments_of_message(blob, num_classes, d, private), len(blob)
    except (safestate.StateError, ValueError) as exc:
        raise NodeError(f"moment sums: {exc}") from None


STATS_LIMIT = 1e6  # the largest |mean| or variance a feature statistic may hold (the loss's features are O(1))


def statistics(blob: bytes, codes: int, class_counts: list[float] | None):
    """A node's feature statistics for the pooled warm start (fl/client.py statistics_message): a
    FeatureStats of the run's codes (per class for a conditional model) whose values are finite and in
    range, variances >= 0, and whose exact class counts (without privacy) are those its reply reported; a
    NodeError otherwise. The layers' shapes are compared between nodes by the server (they must agree)."""
    # (a node's honest statistics can still pull the pooled ones anywhere within range: as its mask can,
    # a node takes part in what the federation learns)
    from prismfl.fl.client import statistics_of_message

    try:
        stats = statistics_of_message(blob, codes)
    except (safestate.StateError, KeyError, TypeError, ValueError) as exc:
        raise NodeError(f"statistics: {exc}") from None
    for t in [*stats.mean, *stats.var]:  # (the schema checked that they are finite, the variances >= 0)
        if not bool((t.double().abs() <= STATS_LIMIT).all()):
            raise NodeError(f"statistics: values beyond +-{STATS_LIMIT:g}")
    if class_counts is not None and (stats.class_counts is None
                                     or stats.class_counts.tolist() != [float(c) for c in class_counts]):  # fmt: skip
        raise NodeError("statistics: class counts that are not those of statistics-class-counts")
    return stats


def _tree(blob: bytes, what: str):
    try:
        return safestate.from_bytes(blob, what)
    except safestate.StateError as exc:
        raise NodeError(str(exc)) from None


def majority(values: dict[int, object]) -> object:
    """The value most partitions sent (ties: the lowest partition's), compared as canonical JSON."""
    keyed = {k: json.dumps(v, sort_keys=True) for k, v in values.items()}
    counts: dict[str, int] = {}
    for k in sorted(keyed):
        counts[keyed[k]] = counts.get(keyed[k], 0) + 1
    best = max(counts.values())
    return next(values[k] for k in sorted(keyed) if counts[keyed[k]] == best)


def train_metrics(metrics) -> tuple[float, float, float]:
    """(loss, start loss, train seconds) of a round's reply: finite numbers >= 0 (what a round record holds)."""
    try:
        got = [metrics[key] for key in ("loss", "start-loss", "train-seconds")]
    except (KeyError, TypeError) as exc:
        raise NodeError(f"the reply's metrics lack {exc}") from None
    for key, x in zip(("loss", "start-loss", "train-seconds"), got):
        if not finite(x, 0, 1e12):
            raise NodeError(f"metrics {key} = {_show(x)} is not a finite number in range")
    return float(got[0]), float(got[1]), float(got[2])
