"""Atomic file writes: a reader, or a run killed at any moment, sees the old file or the new one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write, durable: bool = True) -> None:
    """Write through `write(file)` to a temporary file beside `path`, then rename it into place.

    Readers, and a run killed at any moment, see either the old file or the new one, never half.
    `durable` also flushes to disk before the rename (skipped for the large per-round checkpoint,
    where an fsync costs more than the round's aggregation; a killed process is still safe).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    atomic_write(Path(path), lambda f: f.write(data), durable)
