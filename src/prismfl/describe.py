"""How a value read back from a file is shown in a one-line error: short, printable, its kind and size
rather than its contents (schema's messages and the readers that check fields by hand)."""

from __future__ import annotations

import torch

MISSING = object()  # a field the tree lacks


def short(text: str, limit: int = 40) -> str:
    """`text` cut to `limit` characters, "..." marking the cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(name: str) -> str:
    """A name read from a file, fit for one line of an error: as it is if short and printable, else its repr."""
    return name if name.isprintable() and len(name) <= 60 else short(repr(name), 60)


def describe(x) -> str:
    """A value as an error line shows it: short, one line."""
    if x is MISSING:
        return "nothing (the field is missing)"
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x) if abs(x) < 2**100 else f"an int of {x.bit_length()} bits"
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, str):
        return f"the string {short(repr(x))}"
    if isinstance(x, list):
        return f"a list of {len(x)} item{'s' * (len(x) != 1)}"
    if isinstance(x, dict):
        return "a table" if all(isinstance(k, str) for k in x) else "a table with integer keys"
    if isinstance(x, torch.Tensor):
        return f"a {dtype_name(x.dtype)} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's name without its module: float32."""
    return str(dtype).removeprefix("torch.")


def describe_const(value) -> str:
    """A JSON value as a schema expects it: strings quoted, lists bracketed."""
    if isinstance(value, list):
        return "[" + ", ".join(describe_const(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return describe(value)


def shape_text(shape: tuple) -> str:
    """A shape as a message writes it, "any" where any size fits: (3, any)."""
    parts = ["any" if s is None else str(s) for s in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def range_text(lo, hi) -> str:
    """The bounds as a message appends them: ' in lo..hi', ' >= lo' or ' <= hi' (None: open), or nothing."""
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""
