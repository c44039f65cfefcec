"""Files of a run directory: atomic writes, checkpoints, metrics.jsonl."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.toml"
MODEL = "model.prism"


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def save_checkpoint(run_dir: Path, state: dict) -> None:
    atomic_write(run_dir / CHECKPOINT, lambda f: torch.save(state, f), durable=False)


def load_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, last_round: int) -> None:
    """Drop records after `last_round` (a run killed after logging but before checkpointing)."""
    kept = [r for r in read_metrics(run_dir) if r["round"] <= last_round]
    atomic_write_bytes(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept).encode())
