"""Progress: bars on a terminal; one short line per round in logs, CI and nohup; nothing under --quiet."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def visible() -> bool:
    """Whether bars are drawn: progress is on and stderr is a terminal."""
    return _enabled and sys.stderr.isatty()


def bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that is off when progress is disabled, or when stderr is not a terminal."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if _enabled else True, **kwargs)


def line(message: str) -> None:
    """A progress line for logs: printed to stderr when progress is on but no bar is drawn."""
    if _enabled and not sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)
