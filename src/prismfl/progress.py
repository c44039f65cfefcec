"""Progress bars: shown on a terminal, hidden in logs and under --quiet."""

from __future__ import annotations

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that is off when progress is disabled, or when stderr is not a terminal."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None if _enabled else True, **kwargs)
