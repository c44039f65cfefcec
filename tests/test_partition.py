import numpy as np
import pytest

from prismfl.data.partition import class_table, format_class_table, partition
from prismfl.errors import ConfigError

LABELS = np.repeat(np.arange(10), 100)  # 1,000 images, 100 per class


def _check_complete_disjoint(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
def test_complete_disjoint_and_seeded(scheme):
    a = partition(LABELS, 10, scheme, seed=1, shards_per_client=2, alpha=0.3)
    b = partition(LABELS, 10, scheme, seed=1, shards_per_client=2, alpha=0.3)
    c = partition(LABELS, 10, scheme, seed=2, shards_per_client=2, alpha=0.3)
    _check_complete_disjoint(a, len(LABELS))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_shards_limit_classes_per_client():
    parts = partition(LABELS, 10, "shards", seed=0, shards_per_client=2)
    table = class_table(LABELS, parts, 10)
    # 20 shards of 50 images, each shard from one class: at most 2 classes per client
    assert ((table > 0).sum(1) <= 2).all()
    assert (table.sum(1) == 100).all()


def test_iid_balanced():
    table = class_table(LABELS, partition(LABELS, 5, "iid", seed=0), 10)
    assert (table.sum(1) == 200).all()
    assert table.min() > 5


def test_dirichlet_small_alpha_is_skewed():
    skewed = class_table(LABELS, partition(LABELS, 10, "dirichlet", seed=0, alpha=0.05), 10)
    even = class_table(LABELS, partition(LABELS, 10, "dirichlet", seed=0, alpha=100.0), 10)
    assert (skewed.max(1) / skewed.sum(1)).mean() > 0.6
    assert (even.max(1) / even.sum(1)).mean() < 0.25


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(num_clients=2000, scheme="iid"), "only 1000 training images"),
        (dict(num_clients=10, scheme="dirichlet", alpha=0.0), "alpha must be > 0"),
        (dict(num_clients=10, scheme="dirichlet", alpha=-1.0), "alpha must be > 0"),
        (dict(num_clients=10, scheme="shards", shards_per_client=0), "at least 1"),
        (dict(num_clients=10, scheme="stripes"), "unknown partition scheme"),
        (dict(num_clients=0, scheme="iid"), "at least 1"),
    ],
)
def test_bad_parameters(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        partition(LABELS, **kwargs)


def test_format_class_table():
    text = format_class_table(np.array([[1, 2], [3, 4]]), ["a", "b"])
    assert text.splitlines()[1].split() == ["0", "1", "2", "3"]
    assert text.splitlines()[2].split() == ["1", "3", "4", "7"]
