"""CIFAR-10 and CelebA readers and the attribute partition, on fixture files written here in the real formats."""

import pickle

import numpy as np
import pytest
from PIL import Image

from prismfl.config import config_from_dict
from prismfl.data import celeba, cifar, sources
from prismfl.data.partition import class_table, partition
from prismfl.errors import ConfigError, DataError

# ---------------------------------------------------------------- CIFAR-10


def _cifar_batch(n, offset, labels=None):
    """(n, 3072) uint8 rows whose R, G, B planes are distinguishable: plane p of image i is filled
    with (offset + i) * 3 + p, and pixel (0, 0) of the red plane holds its row-major index mark."""
    data = np.empty((n, 3072), np.uint8)
    for i in range(n):
        for p in range(3):
            data[i, p * 1024 : (p + 1) * 1024] = (offset + i) * 3 + p
        data[i, 1] = 200  # red plane, row 0, column 1
        data[i, 32] = 201  # red plane, row 1, column 0
    return {
        b"batch_label": b"fixture",
        b"data": data,
        b"labels": list(labels if labels is not None else [(offset + i) % 10 for i in range(n)]),
        b"filenames": [b"x.png"] * n,
    }


def _write_cifar(root, meta=True, per_batch=2, n_test=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        with open(folder / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump(_cifar_batch(per_batch, b * per_batch), f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(_cifar_batch(n_test, 40), f, protocol=2)
    if meta:
        names = [n.encode() for n in cifar.CLASS_NAMES]
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=2)
    return folder


def test_cifar_layout_and_labels(tmp_path):
    _write_cifar(tmp_path)
    train = sources.load_split("cifar10", "train", str(tmp_path))  # root above cifar-10-batches-py
    test = sources.load_split("cifar10", "test", str(tmp_path / "cifar-10-batches-py"))  # or the folder itself
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [i % 10 for i in range(10)]
    assert test.images.shape == (3, 3, 32, 32) and test.labels.tolist() == [0, 1, 2]
    img = train.images[7]  # batch 4, second image: planes R, G, B filled with 21, 22, 23
    assert img[1].min() == img[1].max() == 22 and img[2].min() == img[2].max() == 23
    assert img[0, 0, 0] == 21 and img[0, 0, 1] == 200 and img[0, 1, 0] == 201  # row-major within a plane
    assert "CIFAR-10" in train.source and sources.dataset_info("cifar10") == sources.DatasetInfo(
        3, 32, cifar.CLASS_NAMES
    )


def test_cifar_numpy1_pickle_and_custom_meta(tmp_path):
    """A batch pickled by numpy 1.x names numpy.core.multiarray; custom label names are reported."""
    folder = _write_cifar(tmp_path, meta=False)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert sources.load_split("cifar10", "test", str(tmp_path)).images.shape == (3, 3, 32, 32)
    assert cifar.class_names(folder) == cifar.CLASS_NAMES  # no batches.meta: the standard ten
    names = [f"c{i}".encode() for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f, protocol=2)
    assert cifar.class_names(folder) == tuple(f"c{i}" for i in range(10))
    assert "c0, c1" in sources.load_split("cifar10", "test", str(tmp_path)).source


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_corrupt_and_missing(tmp_path):
    folder = _write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3.*cifar-10-python.tar.gz"):
        sources.load_split("cifar10", "train", str(tmp_path))
    (folder / "test_batch").write_bytes(b"\x00garbage bytes, not a pickle")
    with pytest.raises(DataError, match="test_batch is not a CIFAR-10 python batch"):
        sources.load_split("cifar10", "test", str(tmp_path))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="refusing to load"):  # a tampered pickle never runs code
        cifar.read_batch(folder / "test_batch")
    bad = _cifar_batch(2, 0)
    bad[b"data"] = bad[b"data"][:, :3000]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(bad, f, protocol=2)
    with pytest.raises(DataError, match=r"test_batch is corrupt: data is uint8 \(2, 3000\)"):
        cifar.read_batch(folder / "test_batch")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(_cifar_batch(2, 0, labels=[0, 10]), f, protocol=2)
    with pytest.raises(DataError, match="labels outside 0..9"):
        cifar.read_batch(folder / "test_batch")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="no 'data' entry"):
        cifar.read_batch(folder / "test_batch")
    (folder / "batches.meta").write_bytes(b"junk")
    with pytest.raises(DataError, match="batches.meta"):
        cifar.class_names(folder)


def test_cifar_not_found_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="cifar10 not found.*data.root"):
        sources.load_split("cifar10", "train", str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- CelebA

GREEN, RED = (30, 200, 60), (220, 20, 20)
# (file, Male, partition): four train images (two male), one valid, two test
CELEBA_ROWS = [
    ("000001.jpg", 1, 0),
    ("000002.jpg", -1, 0),
    ("000003.jpg", -1, 0),
    ("000004.jpg", 1, 0),
    ("000005.jpg", 1, 1),
    ("000006.jpg", -1, 2),
    ("000007.jpg", 1, 2),
]
ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Male", "Young"]  # a short list; the reader looks up "Male" by name


def _face(i):
    """178 x 218 image: red outside the 160 x 160 centre crop (left 9, top 29), green inside, and a
    brightness mark per image in the crop's top-left 20 x 20 corner."""
    img = Image.new("RGB", (178, 218), RED)
    img.paste(GREEN, (9, 29, 169, 189))
    img.paste((10 * i, 10 * i, 10 * i), (9, 29, 29, 49))
    return img


def _write_celeba(root, csv=False, nested=False, rows=CELEBA_ROWS):
    images = root / "img_align_celeba"
    if nested:
        images = images / "img_align_celeba"
    images.mkdir(parents=True)
    for i, (name, _, _) in enumerate(rows):
        _face(i).save(images / name, quality=100, subsampling=0)
    if csv:
        lines = ["image_id," + ",".join(ATTRS)]
        lines += [f"{n},-1,1,{m},1" for n, m, _ in rows]
        (root / "list_attr_celeba.csv").write_text("\n".join(lines) + "\n")
        lines = ["image_id,partition"] + [f"{n},{p}" for n, _, p in rows]
        (root / "list_eval_partition.csv").write_text("\n".join(lines) + "\n")
    else:
        lines = [str(len(rows)), " ".join(ATTRS)]
        lines += [f"{n} -1  1 {m:>2}  1" for n, m, _ in rows]  # the real file pads with double spaces
        (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, _, p in rows))
    return root


def test_celeba_preprocess_and_labels(tmp_path):
    root = _write_celeba(tmp_path / "celeba-root")
    train = sources.load_split("celeba", "train", str(root))
    test = sources.load_split("celeba", "test", str(root))
    assert train.images.shape == (4, 3, 32, 32) and train.images.dtype == np.uint8
    assert train.labels.tolist() == [1, 0, 0, 1] and test.labels.tolist() == [0, 1]  # Male: 1, else 0
    assert sources.dataset_info("celeba").class_names == ("female", "male")
    # CenterCrop 160 keeps only green (no red border leaks in), resize maps 160 -> 32 (5 px per pixel):
    # the 20 x 20 mark becomes the top-left 4 x 4 block
    for k, img in enumerate(train.images):
        body = img[:, 5:, 5:].reshape(3, -1).astype(int)
        assert np.abs(body - np.array(GREEN)[:, None]).max() <= 6
        assert np.abs(img[:, :3, :3].astype(int) - 10 * k).max() <= 6
    assert np.abs(test.images[1, :, :3, :3].astype(int) - 60).max() <= 6  # 000007.jpg, the seventh face
    # exactly PIL's crop box + bilinear resize
    expected = np.asarray(_face_from_disk(root, "000002.jpg").crop((9, 29, 169, 189)).resize((32, 32), Image.BILINEAR))
    assert np.array_equal(train.images[1], expected.transpose(2, 0, 1))


def _face_from_disk(root, name):
    with Image.open(root / "img_align_celeba" / name) as img:
        return img.convert("RGB")


def test_celeba_cache_is_used_and_keyed_by_the_lists(tmp_path, monkeypatch):
    root = _write_celeba(tmp_path / "c")
    cache = tmp_path / "cache"
    first, labels, source = celeba.read_split(root, "train", cache=cache)
    assert len(list(cache.glob("celeba-train-*.npz"))) == 1 and "cached" not in source

    def no_decoding(path, *args, **kwargs):
        raise AssertionError(f"decoded {path} despite the cache")

    monkeypatch.setattr(celeba, "preprocess", no_decoding)
    again, labels2, source = celeba.read_split(root, "train", cache=cache)
    assert "cached" in source and np.array_equal(first, again) and np.array_equal(labels, labels2)
    monkeypatch.undo()
    # an edited attribute list is a different dataset: new key, labels follow the file
    text = (root / "list_attr_celeba.txt").read_text().replace("000002.jpg -1  1 -1", "000002.jpg -1  1  1")
    (root / "list_attr_celeba.txt").write_text(text)
    _, labels3, source = celeba.read_split(root, "train", cache=cache)
    assert labels3.tolist() == [1, 1, 0, 1] and "cached" not in source
    assert len(list(cache.glob("celeba-train-*.npz"))) == 2
    # a damaged cache file is rebuilt, not trusted
    for f in cache.glob("*.npz"):
        f.write_bytes(b"not an npz")
    rebuilt, _, source = celeba.read_split(root, "train", cache=cache)
    assert np.array_equal(rebuilt, first) and "cached" not in source


def test_celeba_kaggle_layout_matches(tmp_path):
    txt = _write_celeba(tmp_path / "txt")
    csv = _write_celeba(tmp_path / "csv" / "celeba", csv=True, nested=True)  # found through root/celeba/
    a = sources.load_split("celeba", "train", str(txt))
    b = sources.load_split("celeba", "train", str(tmp_path / "csv"))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert csv.is_dir()


def test_celeba_missing_and_corrupt_files(tmp_path):
    root = _write_celeba(tmp_path / "c")
    (root / "img_align_celeba" / "000003.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    with pytest.raises(DataError, match=r"000003.jpg is unreadable"):
        sources.load_split("celeba", "train", str(root))
    (root / "img_align_celeba" / "000003.jpg").unlink()
    with pytest.raises(DataError, match=r"image missing: .*000003.jpg"):
        sources.load_split("celeba", "train", str(root))
    Image.new("RGB", (100, 120)).save(root / "img_align_celeba" / "000003.jpg")
    with pytest.raises(DataError, match=r"000003.jpg is 100x120, smaller than the 160x160"):
        sources.load_split("celeba", "train", str(root))

    attr = root / "list_attr_celeba.txt"
    good = attr.read_text()
    attr.write_text(good.replace("7\n", "9\n", 1))
    with pytest.raises(DataError, match="list_attr_celeba.txt is truncated or corrupt"):
        sources.load_split("celeba", "test", str(root))
    attr.write_text(good.replace("000004.jpg -1  1  1  1", "000004.jpg -1  1  x  1"))
    with pytest.raises(DataError, match="corrupt at image line 4 \\(000004.jpg\\)"):
        sources.load_split("celeba", "test", str(root))
    attr.write_text(good.replace("Male", "Female"))
    with pytest.raises(DataError, match="no 'Male' attribute"):
        sources.load_split("celeba", "test", str(root))
    attr.write_text(good)

    part = root / "list_eval_partition.txt"
    part.write_text(part.read_text().replace("000006.jpg 2", "000006.jpg 7"))
    with pytest.raises(DataError, match="list_eval_partition.txt is corrupt at line 6"):
        sources.load_split("celeba", "test", str(root))
    part.unlink()
    with pytest.raises(DataError, match="list_eval_partition.txt; get img_align_celeba.zip"):
        sources.load_split("celeba", "test", str(root))
    with pytest.raises(DataError, match="celeba not found.*list_attr_celeba.txt.*data.root"):
        sources.load_split("celeba", "test", str(tmp_path / "empty"))


def test_config_accepts_new_datasets_and_scheme():
    for dataset in ("cifar10", "celeba"):
        cfg = config_from_dict({"data": {"dataset": dataset}, "partition": {"scheme": "attribute"}})
        assert cfg.validate().data.dataset == dataset


# ---------------------------------------------------------------- attribute partition

MALE = np.array([1] * 300 + [0] * 500)  # like CelebA: fewer men than women


def test_attribute_partition_five_and_five():
    parts = partition(MALE, 10, "attribute", seed=3)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(MALE) and len(np.unique(allidx)) == len(MALE)
    table = class_table(MALE, parts, 2)
    assert (table[:5, 1] == 0).all() and (table[5:, 0] == 0).all()  # 5 female-only, then 5 male-only
    assert table[:5, 0].tolist() == [100] * 5 and table[5:, 1].tolist() == [60] * 5
    same = partition(MALE, 10, "attribute", seed=3)
    other = partition(MALE, 10, "attribute", seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_attribute_partition_odd_clients_favour_the_larger_group():
    table = class_table(MALE, partition(MALE, 5, "attribute"), 2)
    assert ((table > 0).sum(1) == 1).all()
    assert (table[:, 0] > 0).sum() == 3 and (table[:, 1] > 0).sum() == 2


@pytest.mark.parametrize(
    "labels,clients,msg",
    [
        (np.arange(20) % 10, 4, "needs a binary label"),
        (MALE, 1, "at least 2 clients"),
        (np.array([0] * 10 + [1] * 2), 6, "gives 3 clients label 1, but only 2 images"),
    ],
)
def test_attribute_partition_errors(labels, clients, msg):
    with pytest.raises(ConfigError, match=msg):
        partition(labels, clients, "attribute")
