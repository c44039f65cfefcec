"""The limits of the `prismfl` command's options and their checks: a value out of range is one line naming
its option, before any work is done."""

from __future__ import annotations

from pathlib import Path

from prismfl.configcheck import show_number
from prismfl.errors import PrismError

MAX_SAMPLES = 100_000  # images one command generates (sample --n, evaluate --n and --synthetic, grid --samples)
MAX_SEED = 2**63 - 1  # a noise seed, as a config's seed: in [0, 2^63)
MAX_CLIENTS = 65_535  # privacy --secagg, as partition.num_clients


def check_range(option: str, value: int, low: int, high: int) -> None:
    """Refuse an integer option outside low..high with one line naming it (before any work is done)."""
    if not low <= value <= high:
        raise PrismError(f"{option} must be in {low:,}..{high:,}, got {show_number(value)}")


def output_kind(out: Path, kinds: dict[str, str]) -> str:
    """What an --out path will hold, by its extension; a directory or another extension is refused."""
    if out.is_dir():
        raise PrismError(f"--out {out} is a directory; give a file name ending in {' or '.join(kinds)}")
    kind = kinds.get(out.suffix.lower())
    if kind is None:
        raise PrismError(
            f"--out {out}: write {' or '.join(kinds)} files (by the extension), not {out.suffix or 'none'}"
        )
    return kind
