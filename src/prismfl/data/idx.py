"""Reader for the IDX format of MNIST and FashionMNIST (plain or gzip-compressed)."""

from __future__ import annotations

import gzip
import io
import math
from pathlib import Path

import numpy as np

from prismfl.errors import DataError
from prismfl.files import MAX_DATA_FILE_BYTES, read_capped

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file into an array; any defect is a DataError naming the file."""
    path = Path(path)
    raw = read_capped(path, MAX_DATA_FILE_BYTES, "data file", DataError)
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as z:
                raw = z.read(MAX_DATA_FILE_BYTES + 1)  # a small file may inflate to anything: at most the cap
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
        if len(raw) > MAX_DATA_FILE_BYTES:
            raise DataError(f"{path} decompresses to over prismfl's limit of {MAX_DATA_FILE_BYTES:,} bytes")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header cut short)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize  # Python ints: sizes that overflow int64 are caught
    if len(raw) != expected:
        raise DataError(f"{path} is corrupt: header promises {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write an IDX file (used by tests to make fixtures in the real format)."""
    path = Path(path)
    codes = {np.dtype(v).newbyteorder(">").str: k for k, v in _DTYPES.items()}
    arr = np.asarray(array)
    if arr.dtype == np.uint8:
        code = 0x08
    else:
        big = arr.dtype.newbyteorder(">")
        code = codes[big.str]
        arr = arr.astype(big)
    data = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data += arr.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
