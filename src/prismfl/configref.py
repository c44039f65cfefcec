"""docs/config.md, the reference of every run-config key, generated from config.py: each dataclass field's
type and default, the comments written beside it, its range (configcheck.RANGES) and its allowed values
(configcheck.choices), and which methods honour it (METHODS_OF). A test keeps the file equal to what this
writes, so a key cannot be added undocumented.

Write it: .venv/bin/python -m prismfl.configref docs/config.md
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import sys
import textwrap
import tokenize
from pathlib import Path

from prismfl import config, configcheck

HEADER = """# Configuration reference

Every key of a run configuration: a TOML file (`prismfl train --config FILE`), each key also settable with
`--set section.key=value`. A run directory's `config.toml` is the resolved configuration, every key
included. Unknown keys, values out of range or not allowed, and settings that need others are refused with
one line before anything runs.

Generated from `src/prismfl/config.py` by `python -m prismfl.configref docs/config.md`; a test fails when
this file and the code differ. Which shipped config to start from: [configs.md](configs.md).

The column "methods" says which values of `train.method` use a key; the other methods ignore it, or refuse
a value other than the default with one line (for example `model.conditional` with `fedavg`).
"""

ALL_METHODS = "all"
MASKED = ("prism", "local", "central", "public")  # the methods that train keep-probabilities (not fedavg)
# Which methods honour a key (train.method); a key not listed here is honoured by every method. Kept by
# hand from the methods (fl/methods/) and the checks in config.py: a test checks that every key and method
# named here exists.
METHODS_OF: dict[str, tuple[str, ...]] = {
    "model.estimator": MASKED,
    "model.conditional": MASKED,
    "model.modes": MASKED,
    "loss.codes_per_step": MASKED,
    "train.lr": MASKED,
    "train.dense_lr": ("fedavg",),
    "train.mada": ("prism",),
    "train.smoothing": ("prism",),
    "train.upload_coder": ("prism",),
    "train.broadcast": ("prism",),
    "train.broadcast_levels": ("prism",),
    "train.server_momentum": ("prism",),
    "train.warm_start": ("prism",),
    **{
        f"privacy.{k}": ("prism", "fedavg", "local", "central")  # `public` reads no private data
        for k in ("epsilon", "delta", "clip", "pool", "pool_classes", "shrink", "shrink_to", "split")
    },
    "privacy.secagg": ("prism",),
    "privacy.colluders": ("prism",),
    "privacy.dropouts": ("prism",),
    "robust.rule": ("prism", "fedavg"),  # the methods that aggregate their clients' uploads
    "robust.tolerance": ("prism", "fedavg"),
    "robust.trim": ("prism",),
}


def field_notes(cls) -> dict[str, str]:
    """The comments of each field of a dataclass: the full-line comments right above it, then the one
    after it on its line."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    lines = source.splitlines()
    notes = {}
    for f in dataclasses.fields(cls):
        at = next(i + 1 for i, line in enumerate(lines) if line.strip().startswith(f"{f.name}:"))
        above, i = [], at - 1
        while i in comments and i not in code_lines:
            above.insert(0, comments[i])
            i -= 1
        notes[f.name] = " ".join([*above, *([comments[at]] if at in comments and at in code_lines else [])])
    return notes


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _range(key: str) -> str:
    if key not in configcheck.RANGES:
        return ""
    lo, hi, brackets = configcheck.RANGES[key]
    show = lambda x: "inf" if isinstance(x, float) and math.isinf(x) else f"{x:,}" if isinstance(x, int) else f"{x:g}"  # noqa: E731
    return f"{brackets[0]}{show(lo)}, {show(hi)}{brackets[1]}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def keys(cfg=None) -> list[str]:
    """Every dotted key of a run config."""
    cfg = cfg or config.RunConfig()
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
        else:
            out.append(f.name)
    return out


def markdown() -> str:
    allowed = configcheck.choices()
    parts = [HEADER]
    top = [f for f in dataclasses.fields(config.RunConfig) if not dataclasses.is_dataclass(_default(f))]
    sections = [("", config.RunConfig, top)] + [
        (f.name, type(_default(f)), dataclasses.fields(_default(f)))
        for f in dataclasses.fields(config.RunConfig)
        if dataclasses.is_dataclass(_default(f))
    ]
    for name, cls, fields in sections:
        notes = field_notes(cls)
        title = f"[{name}]" if name else "top level"
        doc = " ".join((cls.__doc__ or "").split()) if name else ""
        doc = "" if doc.startswith(f"{cls.__name__}(") else doc  # (a dataclass's generated signature)
        head = "| key | type | default | allowed | methods | what it does |"
        parts += [f"## {title}", "", *([doc, ""] if doc else []), head, "|---|---|---|---|---|---|"]
        for f in fields:
            key = f"{name}.{f.name}" if name else f.name
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            values = ", ".join(f'"{v}"' for v in allowed[key]) if key in allowed else _range(key)
            note = notes.get(f.name, "")
            methods = ", ".join(METHODS_OF.get(key, (ALL_METHODS,)))
            parts.append(
                f"| `{key}` | {_cell(kind)} | `{_show(_default(f))}` | {_cell(values)} | {methods} | {_cell(note)} |"
            )
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/config.md")
    out.write_text(markdown())
    print(f"wrote {out} ({len(keys())} keys)")


if __name__ == "__main__":
    main()
