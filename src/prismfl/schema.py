"""What a state tree read back from a file must hold, said declaratively, and checked before any of it is used.

A state that prismfl wrote (a checkpoint, a Flower client's saved state: safestate trees) is read back
as nested dicts, lists, numbers, strings and tensors, which a crafted or damaged file can fill with
anything. Each writer states the shape of what it writes next to the code that writes it, as a tree
of the nodes below (`Int`, `Num`, `Tensor`, `List`, `Table`, ...), and the reader checks the tree
against it first (`check`). The first field that does not fit is one StateError line naming it:

    checkpoint field server.synced[3]: expected an int in 0..2 or null, got 7

A node is a callable (value, path) -> None that raises `Mismatch`; `fail` raises one for checks
that span several fields (written as plain code beside the schema).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from prismfl import safestate
from prismfl.describe import MISSING, describe, describe_const, dtype_name, range_text, shape_text, short
from prismfl.safestate import StateError


class Mismatch(Exception):
    def __init__(self, path: str, expected: str, got: str):
        super().__init__(path, expected, got)
        self.path, self.expected, self.got = path, expected, got


def check(node, value, where: str = "checkpoint", path: str = "") -> None:
    """Check `value` (found at `path` of a `where`) against `node`; a StateError of one line if it does not fit."""
    try:
        node(value, path)
    except Mismatch as m:
        raise StateError(f"{where} field {m.path or '(the whole tree)'}: expected {m.expected}, got {m.got}") from None


def fail(path: str, expected: str, value=MISSING, got: str | None = None):
    raise Mismatch(path, expected, got if got is not None else describe(value))


def refuse(path: str, expected: str, value=MISSING, where: str = "checkpoint"):
    """`check`'s StateError for a check written as plain code, outside any node."""
    check(Never(expected), value, where, path)


def join(path: str, key) -> str:
    """The path of `key` below `path`: `a.b` for a name, `a[3]` for an index or integer key."""
    if isinstance(key, str):
        return safestate.join(path, key)
    if type(key) is int:
        return f"{path}[{key}]"
    return f"{path}[{short(repr(key))}]"


def is_int(x) -> bool:
    return type(x) is int


def is_number(x) -> bool:
    return type(x) in (int, float)


class Node:
    expected = "a value"

    def __call__(self, x, path: str) -> None:
        if not self.ok(x):
            fail(path, self.expected, x)

    def ok(self, x) -> bool:
        return True


ANY = Node()


class Int(Node):
    """An int (not a bool, a float or a string) in lo..hi (either bound None: open)."""

    def __init__(self, lo: int | None = None, hi: int | None = None, what: str | None = None):
        self.lo, self.hi = lo, hi
        self.expected = what or f"an int{range_text(lo, hi)}"

    def ok(self, x) -> bool:
        return is_int(x) and (self.lo is None or x >= self.lo) and (self.hi is None or x <= self.hi)


class Num(Node):
    """A number (int or float, not a bool), finite unless `finite` is False, in [lo, hi]."""

    def __init__(self, lo: float | None = None, hi: float | None = None, *, finite: bool = True,
                 above: bool = False, what: str | None = None):  # fmt: skip
        self.lo, self.hi, self.finite, self.above = lo, hi, finite, above
        bound = f" > {lo}" if above and hi is None else range_text(lo, hi)
        self.expected = what or f"a {'finite ' if finite else ''}number{bound}"

    def ok(self, x) -> bool:
        if not is_number(x) or (self.finite and not math.isfinite(x)):
            return False
        if math.isnan(x):  # (not `finite`: a NaN is no number out of range)
            return True
        if self.lo is not None and not (x > self.lo if self.above else x >= self.lo):
            return False
        return self.hi is None or x <= self.hi


class Str(Node):
    def __init__(self, choices: tuple[str, ...] | None = None, max_len: int = 10_000):
        self.choices, self.max_len = choices, max_len
        self.expected = f"one of {', '.join(map(repr, choices))}" if choices else "a string"

    def ok(self, x) -> bool:
        return isinstance(x, str) and len(x) <= self.max_len and (self.choices is None or x in self.choices)


class Null(Node):
    expected = "null"

    def ok(self, x) -> bool:
        return x is None


def json_equal(a, b) -> bool:
    """Equal as JSON values: a bool is not a number, a tuple is a list."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str):
        return type(a) is type(b) and a == b
    if is_number(a):
        return is_number(b) and a == b
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return False


class Const(Node):
    """Exactly this JSON value."""

    def __init__(self, value, what: str | None = None):
        self.value = list(value) if isinstance(value, tuple) else value
        self.expected = what or describe_const(self.value)

    def ok(self, x) -> bool:
        return json_equal(x, self.value)


class Either(Node):
    """The first of `nodes` that fits; when none does, the error of the one that got deepest."""

    def __init__(self, *nodes: Node):
        self.nodes = nodes
        self.expected = " or ".join(n.expected for n in nodes)

    def __call__(self, x, path: str) -> None:
        deepest = None
        for node in self.nodes:
            try:
                node(x, path)
                return
            except Mismatch as m:
                if m.path != path and (deepest is None or len(m.path) > len(deepest.path)):
                    deepest = m
        if deepest is not None:
            raise deepest
        fail(path, self.expected, x)


def Opt(node: Node) -> Node:  # noqa: N802 - a node constructor, like the classes
    """`node` or null."""
    return Either(node, Null())


class List(Node):
    """A list of `item`s: exactly `length` of them (or at least `min_len`, at most `max_len`), all
    different from one another when `unique`."""

    def __init__(self, item: Node = ANY, length: int | None = None, *, min_len: int = 0,
                 max_len: int | None = None, unique: bool = False, what: str | None = None):  # fmt: skip
        self.item, self.length, self.min_len, self.max_len, self.unique = item, length, min_len, max_len, unique
        if what:
            self.expected = what
        elif length is not None:
            self.expected = f"a list of {length} item{'s' * (length != 1)}"
        elif max_len is not None:
            self.expected = f"a list of {min_len} to {max_len} items"
        else:
            self.expected = "a list" + (f" of at least {min_len} item{'s' * (min_len != 1)}" if min_len else "")

    def __call__(self, x, path: str) -> None:
        if not isinstance(x, list):
            fail(path, self.expected, x)
        n = len(x)
        if (self.length is not None and n != self.length) or n < self.min_len or \
                (self.max_len is not None and n > self.max_len):  # fmt: skip
            fail(path, self.expected, x)
        seen = []
        for i, v in enumerate(x):
            self.item(v, join(path, i))
            if self.unique:
                if any(json_equal(v, s) for s in seen):
                    fail(join(path, i), "a value not already in the list", v)
                seen.append(v)


class Items(Node):
    """A list of exactly len(`nodes`) items, item i a `nodes[i]`."""

    def __init__(self, nodes: list[Node], what: str | None = None):
        self.nodes = nodes
        self.expected = what or f"a list of {len(nodes)} item{'s' * (len(nodes) != 1)}"

    def __call__(self, x, path: str) -> None:
        if not isinstance(x, list) or len(x) != len(self.nodes):
            fail(path, self.expected, x)
        for i, (v, node) in enumerate(zip(x, self.nodes)):
            node(v, join(path, i))


class Never(Node):
    """No value at all: for a field that must be absent (Table's `optional`)."""

    def __init__(self, what: str):
        self.expected = what

    def ok(self, x) -> bool:
        return False


class Table(Node):
    """A dict with string keys: every key of `fields`, the keys of `optional` where present, and
    other keys only as `extra` allows (None: none)."""

    def __init__(self, fields: dict, optional: dict | None = None, extra: Node | None = ANY, what: str = "a table"):
        self.fields, self.optional, self.extra, self.expected = fields, optional or {}, extra, what

    def __call__(self, x, path: str) -> None:
        if not isinstance(x, dict) or not all(isinstance(k, str) for k in x):
            fail(path, self.expected, x)
        for key, node in self.fields.items():
            if key not in x:
                fail(join(path, key), node.expected, MISSING)
            node(x[key], join(path, key))
        for key, node in self.optional.items():
            if key in x:
                node(x[key], join(path, key))
        for key in x:
            if key not in self.fields and key not in self.optional:
                if self.extra is None:
                    fail(join(path, key), "no such field", x[key])
                self.extra(x[key], join(path, key))


class IntKeys(Node):
    """A dict with integer keys (safestate's integer-keyed dicts), each key a `key`, each value a `value`."""

    def __init__(self, key: Int, value: Node = ANY, what: str | None = None):
        self.key, self.value = key, value
        self.expected = what or "a table with integer keys"

    def __call__(self, x, path: str) -> None:
        if not isinstance(x, dict):
            fail(path, self.expected, x)
        for k, v in x.items():
            if not self.key.ok(k):
                fail(join(path, k) if is_int(k) else path, f"keys {self.key.expected}", got=f"the key {describe(k)}")
            self.value(v, join(path, k))


class Tensor(Node):
    """A tensor of `dtype` and `shape` (None in it: any size there), its values finite (floating
    dtypes) and at least `lo` unless told otherwise."""

    def __init__(self, dtype: torch.dtype, shape: tuple | None = None, *, finite: bool = True,
                 lo: float | None = None, what: str | None = None):  # fmt: skip
        self.dtype, self.shape, self.finite, self.lo = dtype, shape, finite, lo
        if what:
            self.expected = what
        else:
            size = "" if shape is None else f" of shape {shape_text(shape)}"
            values = " of finite values" if finite and dtype.is_floating_point else ""
            values += f" >= {lo}" if lo is not None else ""
            self.expected = f"a {dtype_name(dtype)} tensor{size}{values}"

    def __call__(self, x, path: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dtype != self.dtype or x.is_sparse or not self._shape_ok(x.shape):
            fail(path, self.expected, x)
        if self.finite and self.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
            fail(path, self.expected, got=f"{describe(x)} with non-finite values")
        if self.lo is not None and x.numel() and float(x.min()) < self.lo:
            fail(path, self.expected, got=f"{describe(x)} with values below {self.lo}")

    def _shape_ok(self, shape) -> bool:
        return self.shape is None or (len(shape) == len(self.shape) and
                                      all(w is None or w == s for w, s in zip(self.shape, shape)))  # fmt: skip


class Json(Node):
    """A JSON value: no tensor anywhere in it (what is written to a JSON file or a model file's header)."""

    expected = "a JSON value (no tensor)"

    def ok(self, x, depth: int = 0) -> bool:
        if depth > 32:
            return False
        if x is None or isinstance(x, bool | int | float | str):
            return True
        if isinstance(x, list):
            return all(self.ok(v, depth + 1) for v in x)
        if isinstance(x, dict):
            return all(isinstance(k, str) and self.ok(v, depth + 1) for k, v in x.items())
        return False


class Each(Node):
    """`node`, then `more(x, path)` for what spans its parts (plain code that calls `fail`)."""

    def __init__(self, node: Node, more):
        self.node, self.more, self.expected = node, more, node.expected

    def __call__(self, x, path: str) -> None:
        self.node(x, path)
        self.more(x, path)


@functools.cache
def adam_defaults() -> dict:
    """The hyperparameters of a torch Adam built with its defaults, as its state_dict holds them."""
    return torch.optim.Adam([torch.zeros(1, requires_grad=True)]).state_dict()["param_groups"][0]


def adam(shapes: list[tuple[int, ...]] | None, lr: Node, betas: Node) -> Node:
    """The state_dict of a torch Adam over tensors of `shapes` (None: any number and shapes), built with
    torch's defaults but for `lr` and `betas`: what `load_state_dict` needs so that training does not
    fail later (an amsgrad state without its extra moments, an exp_avg of another shape) or go
    quietly wrong (`maximize`, a weight decay)."""
    defaults = adam_defaults()
    group = {k: Const(v) for k, v in defaults.items() if k not in ("lr", "betas", "params", "eps", "weight_decay")}
    count = None if shapes is None else len(shapes)
    params = List(Int(0), what="the parameters' indices") if count is None else \
        Const(list(range(count)), what=f"the parameter indices [0..{count - 1}]")  # fmt: skip
    group_node = Table({"lr": lr, "betas": betas, "eps": Const(defaults["eps"]),
                        "weight_decay": Const(defaults["weight_decay"]), "params": params},
                       optional=group)  # fmt: skip

    def moments(i: int) -> Node:
        shape = None if shapes is None else tuple(shapes[i])
        return Table({"step": Tensor(torch.float32, (), lo=0.0), "exp_avg": Tensor(torch.float32, shape),
                      "exp_avg_sq": Tensor(torch.float32, shape, lo=0.0)})  # fmt: skip

    def state(x, path: str) -> None:
        IntKeys(Int(0, None if count is None else count - 1))(x, path)
        for i, v in x.items():
            moments(i)(v, join(path, i))

    def groups(x, path: str) -> None:
        if shapes is None:  # the indices of the state must be those of the group
            state_keys, listed = set(x["state"]), set(x["param_groups"][0]["params"])
            if not state_keys <= listed:
                fail(join(path, "state"), "states of the listed parameters only", got=f"keys {sorted(state_keys)[:5]}")

    node = Table({"state": Each(ANY, state), "param_groups": List(group_node, 1)}, what="an Adam optimizer state")
    return Each(node, groups)


@dataclass
class Expect:
    """What a state read back must fit, where it is known (None: not checked there)."""

    num_weights: int | None = None
    table_hash: int | None = None
    num_clients: int | None = None
    round: int | None = None  # the checkpoint's round: the rounds a state names are at most this
    features: list[tuple[int, ...]] | None = None  # the loss's feature layers' shapes, one (D,) per layer
    params: list[tuple[int, ...]] | None = None  # the shapes of the tensors local training updates
    images: dict[int, int] | None = None  # how many images each client holds (for exact statistics' counts)

    @property
    def client(self) -> Int:
        """A client id: an int in 0..num_clients - 1."""
        k = self.num_clients
        if k is None:
            return Int(0, what="a client id (an int >= 0)")
        return Int(0, k - 1, what=f"a client id (an int in 0..{k - 1})")

    def rounds(self, last: int | None = None) -> Int:
        """A round in 0..last (default: this checkpoint's round)."""
        hi = self.round if last is None else last
        return Int(0, hi, what=f"a round (an int in 0..{hi})" if hi is not None else "a round (an int >= 0)")


TABLE_HASH = Int(0, 2**64 - 1, what="a layer-table hash (an int in [0, 2^64))")
