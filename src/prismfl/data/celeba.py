"""Reader for CelebA as distributed: the aligned images and the attribute and partition lists.

Layout (the dataset's own; torchvision's "celeba/" subfolder and Kaggle's doubled image folder and
CSV lists are found too):

    img_align_celeba/000001.jpg ...        178 x 218 aligned faces
    list_attr_celeba.txt                   count; the 40 attribute names; "file v1 ... v40" with 1/-1
    list_eval_partition.txt                "file 0|1|2" = train / valid / test

Images are preprocessed as in the paper: CenterCrop 160, then resize to 32 x 32 (PIL bilinear,
antialiased when shrinking). The label is the "Male" attribute (0 = female, 1 = male). Decoding
the ~200k JPEGs takes minutes, so the preprocessed uint8 arrays are cached under
<prismfl cache>/preprocessed/, keyed by a checksum of the two lists, the image folder (path and mtime), crop and size.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from prismfl.errors import DataError

IMAGES = "img_align_celeba"
ATTR = "list_attr_celeba"
PARTITION = "list_eval_partition"
LABEL_ATTRIBUTE = "Male"
CLASS_NAMES = ("female", "male")
CROP, SIZE = 160, 32
SPLITS = {"train": 0, "valid": 1, "test": 2}
CACHE_VERSION = 1
FETCH_HINT = (
    "get img_align_celeba.zip, list_attr_celeba.txt and list_eval_partition.txt from the CelebA page "
    "(mmlab.ie.cuhk.edu.hk/projects/CelebA.html), unzip the images beside the lists, "
    "and set data.root to that folder"
)


def find_folder(candidates: list[Path]) -> Path | None:
    """The first candidate that holds the attribute list (directly or in a celeba/ subfolder)."""
    for folder in candidates:
        for inner in (folder, folder / "celeba"):
            if _list_path(inner, ATTR) is not None:
                return inner
    return None


def _list_path(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".txt", stem + ".csv"):
        if (folder / name).is_file():
            return folder / name
    return None


def _image_folder(folder: Path) -> Path:
    for inner in (folder / IMAGES / IMAGES, folder / IMAGES):  # Kaggle's archive nests the folder twice
        if inner.is_dir():
            return inner
    raise DataError(f"CelebA image folder missing: {folder / IMAGES}; {FETCH_HINT}")


def _read_text(path: Path) -> str:
    from prismfl.files import MAX_DATA_FILE_BYTES, read_capped

    try:
        return read_capped(path, MAX_DATA_FILE_BYTES, "CelebA list", DataError).decode()
    except UnicodeDecodeError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def read_attributes(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(file names, attribute names, int8 values (N, 40) in {-1, 1}) from list_attr_celeba.txt or .csv."""
    path = Path(path)
    lines = [line for line in _read_text(path).splitlines() if line.strip()]
    if path.suffix == ".csv":  # Kaggle: "image_id,attr1,...", then "file,v1,..."
        if not lines:
            raise DataError(f"{path} is empty")
        names = [n.strip() for n in lines[0].split(",")[1:]]
        rows = [line.split(",") for line in lines[1:]]
        expected = None
    else:
        if len(lines) < 2 or not lines[0].strip().isdigit():
            raise DataError(f"{path} is not a CelebA attribute list: the first line should be the image count")
        expected, names = int(lines[0]), lines[1].split()
        rows = [line.split() for line in lines[2:]]
    if LABEL_ATTRIBUTE not in names:
        raise DataError(f"{path} has no {LABEL_ATTRIBUTE!r} attribute (found {len(names)} names: {names[:5]}...)")
    if expected is not None and expected != len(rows):
        raise DataError(f"{path} is truncated or corrupt: its header promises {expected} images, it lists {len(rows)}")
    files, values = [], np.empty((len(rows), len(names)), np.int8)
    for i, row in enumerate(rows):
        try:
            if len(row) != len(names) + 1:
                raise ValueError(f"{len(row) - 1} values for {len(names)} attributes")
            values[i] = [int(v) for v in row[1:]]
        except ValueError as exc:
            raise DataError(f"{path} is corrupt at image line {i + 1} ({row[0] if row else ''}): {exc}") from None
        files.append(row[0].strip())
    if not np.isin(values, (-1, 1)).all():
        raise DataError(f"{path} is corrupt: attribute values must be 1 or -1")
    return files, names, values


def read_partition(path: str | Path) -> dict[str, int]:
    """file name -> 0 (train), 1 (valid), 2 (test) from list_eval_partition.txt or .csv."""
    path = Path(path)
    lines = [line for line in _read_text(path).splitlines() if line.strip()]
    if path.suffix == ".csv" and lines:
        lines = lines[1:]  # header "image_id,partition"
    out: dict[str, int] = {}
    for i, line in enumerate(lines):
        row = line.replace(",", " ").split()
        if len(row) != 2 or row[1] not in ("0", "1", "2"):
            raise DataError(f"{path} is corrupt at line {i + 1}: expected 'filename 0|1|2', found {line.strip()!r}")
        out[row[0]] = int(row[1])
    return out


def preprocess(path: Path, crop: int = CROP, size: int = SIZE) -> np.ndarray:
    """One image file -> uint8 (3, size, size): centre crop of crop x crop, then bilinear resize."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"CelebA image missing: {path}; the image folder is incomplete ({FETCH_HINT})") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"CelebA image {path} is unreadable ({exc}); replace it from img_align_celeba.zip") from None
    w, h = img.size
    if w < crop or h < crop:
        raise DataError(f"CelebA image {path} is {w}x{h}, smaller than the {crop}x{crop} centre crop")
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))  # as torchvision's CenterCrop
    img = img.crop((left, top, left + crop, top + crop)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _checksum(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_split(folder: str | Path, split: str, cache: Path | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """uint8 images (N, 3, 32, 32), int64 labels (Male: 0/1) and a description, for 'train'/'valid'/'test'."""
    folder = Path(folder)
    if split not in SPLITS:
        raise DataError(f"unknown CelebA split {split!r}; expected one of {', '.join(SPLITS)}")
    attr_path, part_path = _list_path(folder, ATTR), _list_path(folder, PARTITION)
    for stem, p in ((ATTR, attr_path), (PARTITION, part_path)):
        if p is None:
            raise DataError(f"CelebA list missing: {folder / stem}.txt; {FETCH_HINT}")
    images_dir = _image_folder(folder)
    files, names, values = read_attributes(attr_path)
    parts = read_partition(part_path)
    missing = [f for f in files if f not in parts]
    if missing:
        raise DataError(f"{part_path} does not list {len(missing)} images of {attr_path} (first: {missing[0]})")
    keep = [i for i, f in enumerate(files) if parts[f] == SPLITS[split]]
    if not keep:
        raise DataError(f"{part_path} puts no image in the {split} split")
    labels = (values[keep, names.index(LABEL_ATTRIBUTE)] > 0).astype(np.int64)
    split_files = [files[i] for i in keep]

    spec = {
        "version": CACHE_VERSION,
        "lists": _checksum([attr_path, part_path]),
        "images": str(images_dir.resolve()),
        "images_mtime": images_dir.stat().st_mtime_ns,  # files added, removed or renamed since: decode again
        "crop": CROP,
        "size": SIZE,
        "split": split,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    cache_file = (cache or _default_cache()) / f"celeba-{split}-{CROP}to{SIZE}-{key}.npz"
    source = f"CelebA {split} ({len(keep):,} images, CenterCrop {CROP} -> {SIZE}) in {folder}"
    images = _load_cache(cache_file, len(keep), labels)
    if images is not None:
        return images, labels, source + f", cached in {cache_file}"
    images = _decode_all([images_dir / f for f in split_files], split)
    _save_cache(cache_file, images, labels, spec)
    return images, labels, source


def _default_cache() -> Path:
    from prismfl.cache import cache_dir

    return cache_dir() / "preprocessed"


def _load_cache(path: Path, n: int, labels: np.ndarray) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images, cached_labels = z["images"], z["labels"]
    except Exception:  # a half-written or damaged cache is rebuilt, never trusted
        return None
    if images.shape != (n, 3, SIZE, SIZE) or images.dtype != np.uint8 or not np.array_equal(cached_labels, labels):
        return None
    return images


def _save_cache(path: Path, images: np.ndarray, labels: np.ndarray, spec: dict) -> None:
    from prismfl.files import atomic_write

    try:
        atomic_write(path, lambda f: np.savez(f, images=images, labels=labels, spec=json.dumps(spec)), durable=False)
    except OSError:  # a read-only cache costs time on the next run, not correctness
        pass


def _decode_all(paths: list[Path], split: str) -> np.ndarray:
    from prismfl.progress import bar

    out = np.empty((len(paths), 3, SIZE, SIZE), np.uint8)
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        for i, img in enumerate(bar(pool.map(preprocess, paths), total=len(paths), desc=f"CelebA {split}", unit="img")):
            out[i] = img
    return out
