"""Files: atomic writes (a reader, or a run killed at any moment, sees the old file or the new one), and
bounded reads of files a user names (a regular file of at most a size cap for its kind, never a device or pipe)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from prismfl.errors import PrismError


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


# ---------------------------------------------------------------- reading files a user names

# The caps of files of kinds with no format-derived one (a model file's and a config's are in modelfile and config)
MAX_CHECKPOINT_BYTES = 16 << 30  # a run's checkpoint: the server's and every simulated client's state
MAX_NET_WEIGHTS_BYTES = 2 << 30  # a network's weights (Inception-v3 about 100 MB, VGG19-BN 550 MB)
MAX_DATA_FILE_BYTES = 4 << 30  # one file of a dataset (an IDX file, a CIFAR-10 batch, a CelebA list)
MAX_RECORD_BYTES = 16 << 20  # a JSON record in a run directory (evaluation.json: a few kB)


def read_capped(path, cap: int, what: str, error: type[PrismError] = PrismError, missing: str | None = None) -> bytes:
    """The bytes of the regular file `path`, at most `cap` of them; anything else raises `error` with one line.

    A device (/dev/zero), a pipe (which would block), a directory or a file over `cap` bytes is refused
    before anything is read. The file is opened without blocking and checked through its descriptor,
    so a path swapped for a pipe between the check and the read cannot hang or flood prismfl.
    `missing` is the message for a path that does not exist (default: "<what> not found: <path>").
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(missing or f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{what} {path} is a directory; give a file")
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path} is not a regular file (a device, pipe or socket); give a file")
        if info.st_size > cap:
            raise error(f"{what} {path} is {info.st_size:,} bytes, over prismfl's limit of {cap:,}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(info.st_size + 1)  # one byte more: a file that grew since fstat is noticed
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) != info.st_size:
        raise error(f"{what} {path} changed while it was read; try again")
    return data
