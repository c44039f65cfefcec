"""Reader for CIFAR-10's "python version" (the cifar-10-batches-py folder of pickled batches).

Each batch is a pickled dict with b"data", an (N, 3072) uint8 array whose rows hold the red, then
green, then blue 32x32 plane in row-major order, and b"labels", a list of N ints in 0..9. The
optional batches.meta holds b"label_names". The pickles are read with an unpickler that accepts
nothing but numpy arrays and plain Python containers, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from prismfl.errors import DataError
from prismfl.files import MAX_DATA_FILE_BYTES, read_capped

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
META = "batches.meta"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FETCH_HINT = (
    "get cifar-10-python.tar.gz from the CIFAR-10 page (www.cs.toronto.edu/~kriz/cifar.html), extract it, "
    "and set data.root to the folder that holds cifar-10-batches-py"
)

# What numpy's ndarray pickles refer to, across numpy 1.x and 2.x (and _codecs.encode, which Python 3's
# protocol-2 pickles use for bytes); nothing else is allowed.
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    raw = read_capped(
        path, MAX_DATA_FILE_BYTES, "CIFAR-10 file", DataError, f"CIFAR-10 file missing: {path}; {FETCH_HINT}"
    )
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means the file is not a CIFAR batch
        raise DataError(
            f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc}); re-extract cifar-10-python.tar.gz"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR-10 python batch (holds a {type(obj).__name__}, not a dict)")
    # Batches written by Python 2 have bytes keys; accept str keys from a Python 3 re-save too.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    path = Path(path)
    batch = _unpickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise DataError(f"{path} is corrupt: no {key!r} entry (has {sorted(map(str, batch))})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path} is corrupt: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path} is corrupt: {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{path} is corrupt: labels outside 0..9 ({labels.min()}..{labels.max()})")
    return data.reshape(-1, 3, 32, 32).copy(), labels.astype(np.int64)


def class_names(folder: str | Path) -> tuple[str, ...]:
    """The names in batches.meta when it is there and sound, else the standard ten."""
    path = Path(folder) / META
    if not path.is_file():
        return CLASS_NAMES
    names = _unpickle(path).get("label_names")
    if not isinstance(names, list) or len(names) != len(CLASS_NAMES):
        raise DataError(f"{path} is corrupt: expected 10 label_names; re-extract cifar-10-python.tar.gz")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def find_folder(candidates: list[Path]) -> Path | None:
    """The first candidate that is, or directly holds, a cifar-10-batches-py folder."""
    for folder in candidates:
        for inner in (folder, folder / FOLDER):
            if (inner / TRAIN_BATCHES[0]).is_file() or (inner / TEST_BATCHES[0]).is_file():
                return inner
    return None


def read_split(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """'train' (data_batch_1..5, 50,000 images) or 'test' (test_batch, 10,000 images)."""
    folder = Path(folder)
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    for name in names:  # name every missing file before reading any
        if not (folder / name).is_file():
            raise DataError(f"CIFAR-10 file missing: {folder / name}; {FETCH_HINT}")
    parts = [read_batch(folder / name) for name in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
