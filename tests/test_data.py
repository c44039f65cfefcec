import gzip

import numpy as np
import pytest

from prismfl.data import sources
from prismfl.data.idx import read_idx, write_idx
from prismfl.errors import DataError


def _write_fmnist(folder, n_train=20, n_test=10, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, arr, compress=compress)
    assert np.array_equal(read_idx(path), arr)
    raw = path.read_bytes()
    if not compress:  # the exact IDX header: magic 0x00000803, then big-endian dims
        assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])


def test_idx_int32_big_endian(tmp_path):
    arr = np.array([1, -2, 300000], dtype=np.int32)
    write_idx(tmp_path / "b.idx", arr)
    assert (tmp_path / "b.idx").read_bytes()[4:8] == (3).to_bytes(4, "big")
    assert read_idx(tmp_path / "b.idx").tolist() == [1, -2, 300000]


def test_idx_corrupt_files(tmp_path):
    p = tmp_path / "x.idx"
    write_idx(p, np.zeros((4, 5), np.uint8))
    raw = p.read_bytes()
    (tmp_path / "trunc.idx").write_bytes(raw[:-3])
    with pytest.raises(DataError, match="trunc.idx is corrupt"):
        read_idx(tmp_path / "trunc.idx")
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(DataError, match="magic.idx is not an IDX file"):
        read_idx(tmp_path / "magic.idx")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(raw)[:20])
    with pytest.raises(DataError, match="bad.gz"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "missing.idx")


def test_load_split_from_root(tmp_path):
    root = _write_fmnist(tmp_path / "fm")
    train = sources.load_split("fashion-mnist", "train", str(root))
    test = sources.load_split("fashion-mnist", "test", str(root))
    assert train.images.shape == (20, 1, 28, 28) and train.images.dtype == np.uint8
    assert test.labels.tolist() == [i % 10 for i in range(10)]


def test_missing_companion_file_is_named(tmp_path):
    root = _write_fmnist(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        sources.load_split("fashion-mnist", "test", str(root))


def test_bad_root_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        sources.load_split("fashion-mnist", "train", str(tmp_path / "nowhere"))


def test_mnist5k_reader(tmp_path):
    rows = np.concatenate([np.full((50, 784), 7), np.repeat(np.arange(10), 5)[:, None]], axis=1)
    path = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    train, test = sources.read_mnist5k(path, "train"), sources.read_mnist5k(path, "test")
    assert len(train) + len(test) == 50 and len(test) == 10
    assert np.bincount(test.labels).tolist() == [1] * 10  # stratified
    assert (train.images == 7).all() and "subset" in train.source
    with gzip.open(tmp_path / "bad.csv.gz", "wt") as f:
        f.write("1,2,3\n")
    with pytest.raises(DataError, match="785 columns"):
        sources.read_mnist5k(tmp_path / "bad.csv.gz", "train")


def test_real_mnist_subset_is_announced():
    split = sources.read_mnist5k(sources.mnist5k_path(), "train")
    assert len(split) == 4000 and "subset" in split.source


def test_to_float_scaling_and_resize():
    x = np.array([[[[0, 255], [255, 0]]]], dtype=np.uint8)
    t = sources.to_float(x)
    assert t.tolist() == [[[[-1.0, 1.0], [1.0, -1.0]]]]
    assert sources.to_float(np.zeros((2, 1, 28, 28), np.uint8), resize=32).shape == (2, 1, 32, 32)
