"""Nested state (dicts, lists, numbers, strings, tensors) as bytes that cannot run code when read.

The bytes are a safetensors file: the tensors, plus the tree itself as JSON in the file's metadata,
with each tensor replaced by {"$tensor": name}. Checkpoints and a Flower client's saved state use
it; nothing prismfl reads back is a pickle. Dicts with integer keys (an optimizer's state) are
kept as {"$int_keys": [[key, value], ...]}; tuples come back as lists.
"""

from __future__ import annotations

import json
import struct

import torch

from prismfl.errors import PrismError

META_KEY = "prismfl-state"
MAX_DEPTH = 64


class StateError(PrismError):
    """Bytes that are not a state this prismfl wrote (corrupt, truncated, or something else)."""


def to_bytes(tree) -> bytes:
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}

    def encode(x, depth: int):
        if depth > MAX_DEPTH:
            raise TypeError("state nested too deeply")
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().cpu().clone().contiguous()
            return {"$tensor": name}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in x):
                return {k: encode(v, depth + 1) for k, v in x.items()}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in x):
                return {"$int_keys": [[k, encode(v, depth + 1)] for k, v in x.items()]}
            raise TypeError(f"dict keys must be all str (not starting with $) or all int: {list(x)[:3]}")
        if isinstance(x, list | tuple):
            return [encode(v, depth + 1) for v in x]
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a prismfl state")

    tree_json = json.dumps(encode(tree, 0), separators=(",", ":"))
    return save(tensors, metadata={META_KEY: tree_json})


def read_header(data: bytes, what: str) -> dict:
    if len(data) < 8:
        raise StateError(f"{what} is not a prismfl state (too short)")
    (size,) = struct.unpack_from("<Q", data)
    if size > len(data) - 8:
        raise StateError(f"{what} is truncated (header of {size} bytes, {len(data) - 8} present)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{what} has an unreadable header: {str(exc)[:100]}") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise StateError(f"{what} is not a prismfl state (no metadata)")
    return header


def from_bytes(data: bytes, what: str = "state"):
    """The tree `to_bytes` wrote; anything else raises StateError (never another exception type)."""
    from safetensors.torch import load

    meta = read_header(data, what)["__metadata__"]
    if not isinstance(meta.get(META_KEY), str):
        raise StateError(f"{what} is a safetensors file but not a prismfl state")
    try:
        tree = json.loads(meta[META_KEY])
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{what}: state tree does not parse: {str(exc)[:100]}") from None
    try:
        tensors = load(bytes(data))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own and builtin types
        raise StateError(f"{what}: tensors do not load: {str(exc)[:100]}") from None
    return decode_tree(tree, tensors, what)


def decode_tree(tree, tensors: dict[str, torch.Tensor], what: str = "state"):
    """The state a parsed JSON tree stands for, its tensor references resolved in `tensors` (each used
    at most once); a StateError for a reference or marker that is not one `to_bytes` writes."""
    used: set[str] = set()

    def field(path: str) -> str:
        return f"{what} field {path}" if path else what

    def decode(x, depth: int, path: str):
        if depth > MAX_DEPTH:
            raise StateError(f"{field(path)}: state nested too deeply")
        if isinstance(x, dict):
            if set(x) == {"$tensor"}:
                name = x["$tensor"]
                if not isinstance(name, str) or name not in tensors or name in used:
                    raise StateError(f"{field(path)}: bad tensor reference {name!r:.60} (not a tensor of the file, "
                                     "or one referenced twice)")  # fmt: skip
                used.add(name)
                return tensors[name]
            if set(x) == {"$int_keys"}:
                pairs = x["$int_keys"]
                if (
                    not isinstance(pairs, list)
                    or not all(isinstance(p, list) and len(p) == 2 and type(p[0]) is int for p in pairs)
                    or len({p[0] for p in pairs}) != len(pairs)
                ):
                    raise StateError(f"{field(path)}: bad integer-keyed dict (not [[key, value], ...] with distinct "
                                     "int keys)")  # fmt: skip
                return {k: decode(v, depth + 1, f"{path}[{k}]") for k, v in pairs}
            if any(k.startswith("$") for k in x):
                raise StateError(f"{field(path)}: unknown marker in {[k[:20] for k in sorted(x)[:3]]}")
            return {k: decode(v, depth + 1, join(path, k)) for k, v in x.items()}
        if isinstance(x, list):
            return [decode(v, depth + 1, f"{path}[{i}]") for i, v in enumerate(x)]
        return x

    return decode(tree, 0, "")


def join(path: str, key: str) -> str:
    """`a.b` below `a` for a plain name, `a['...']` for any other key (as an error line shows a field)."""
    plain = key.isidentifier() and len(key) <= 60
    return (f"{path}.{key}" if path else key) if plain else f"{path}[{key[:40]!r}]"


def require(tree, keys: dict[str, type | tuple[type, ...]], what: str) -> dict:
    """Check that `tree` is a dict holding `keys` with the given types; return it."""
    if not isinstance(tree, dict):
        raise StateError(f"{what} is not a table")
    for key, kind in keys.items():
        if key not in tree:
            raise StateError(f"{what} lacks '{key}'")
        if not isinstance(tree[key], kind) or (kind is int and isinstance(tree[key], bool)):
            raise StateError(f"{what}: '{key}' has the wrong type ({type(tree[key]).__name__})")
    return tree
