"""Runs without public images (partition.public_holdout = 0): everything that trains or is fitted comes
from the clients' own partitions or from data of another distribution that the config names.

Checked here: the pooled statistics are exactly those of the union of the clients' images; the
federation's modes are the slices of a hand-built class's principal direction; a run reads no training
image outside the clients' partitions (recorded on the loaded split itself, with a public hold-out as the
control that the recording sees such reads); the warm start trains on the pooled statistics; the public
feature net of another dataset; refusals in one line.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_fmnist
from prismfl.config import ConfigError, load_config
from prismfl.data import federation
from prismfl.data import modes as modes_mod
from prismfl.data.sources import Split
from prismfl.fl import simulate
from prismfl.fl.client import moments_message, moments_of_message, statistics_message, statistics_of_message
from prismfl.loss import feature_nets
from prismfl.loss.matching import FeatureStats, combine_stats, feature_stats

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
QUIET = {"log": lambda *_: None}


def _extract(x):
    flat = x.flatten(1)
    return [flat, flat[:, :3] ** 2]


@pytest.mark.parametrize("per_class", [False, True])
def test_pooled_statistics_are_those_of_the_union(per_class):
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 1, 2, 3, generator=gen) * (1 + i) + i for i, n in enumerate((7, 12, 5))]
    labels = [torch.randint(0, 3, (len(p),), generator=gen) for p in parts]
    kw = [{"labels": y, "num_classes": 3} if per_class else {} for y in labels]
    pooled = combine_stats([feature_stats(_extract, p, **k) for p, k in zip(parts, kw)])
    union = feature_stats(_extract, torch.cat(parts), **({"labels": torch.cat(labels), "num_classes": 3}
                                                         if per_class else {}))  # fmt: skip
    assert pooled.count == union.count == 24
    for a, b in zip([*pooled.mean, *pooled.var], [*union.mean, *union.var]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if per_class:
        assert torch.equal(pooled.class_counts, union.class_counts)


def test_combine_stats_refuses_a_mix_of_per_class_and_not():
    a = feature_stats(_extract, torch.zeros(2, 1, 2, 3))
    b = feature_stats(_extract, torch.zeros(2, 1, 2, 3), labels=torch.tensor([0, 1]), num_classes=2)
    with pytest.raises(ValueError, match="all per class or all not"):
        combine_stats([a, b])


def test_principal_modes_slice_the_class_along_its_first_direction():
    """Class 0 varies only in the brightness of its left half (2 x 2 blocks): its first principal direction
    is that half, and 3 modes cut it at the slices of a Gaussian: centres -/0/+ 1.0911 sd."""
    rng = np.random.default_rng(0)
    t = rng.normal(size=600)
    images = np.zeros((600, 1, 4, 4))
    images[:, 0, :, :2] = 5 + t[:, None, None]  # left half: 8 pixels, pooled to 2 values of 5 + t
    labels = np.zeros(600, dtype=np.int64)
    sums = modes_mod.moment_sums(images[:200], labels[:200], 2)  # two "clients" of one class
    more = modes_mod.moment_sums(images[200:], labels[200:], 2)
    summed = {k: sums[k] + more[k] for k in sums}
    m = modes_mod.principal_modes(summed, 3, (1, 4, 4))
    assert m.centres[1] is None  # class 1 has no image: one mode
    sd = np.sqrt(2 * t.var())  # the pooled coordinate along (1, 1, 0, 0)/sqrt(2): sqrt(2) x t's deviation
    np.testing.assert_allclose(np.abs(m.centres[0][:, 0]), np.array([1.0911, 0, 1.0911]) * sd, atol=1e-3 * sd)
    codes = m.codes(images, labels)
    coord = (t - t.mean()) * np.sqrt(2) * np.sign(m.bases[0][0, 0])
    order = np.argsort(m.centres[0][:, 0])  # the modes from low to high coordinate
    rank = np.argsort(order)[codes]
    assert np.all(np.diff(rank[np.argsort(coord)]) >= 0)  # monotone in the coordinate: slices, not clusters
    shares = np.bincount(codes, minlength=3) / 600
    assert shares.min() > 0.25  # about 0.29 / 0.41 / 0.29 for a Gaussian


class Recording(np.ndarray):
    """A training split's images that record every index read through them."""

    reads: list = []

    def __getitem__(self, key):
        Recording.reads.append(key)
        return np.asarray(super().__getitem__(key))


def _read_indices(n: int) -> set[int]:
    out: set[int] = set()
    for key in Recording.reads:
        if isinstance(key, tuple):
            key = key[0]
        out.update(np.arange(n)[key].reshape(-1).tolist())
    return out


@needs_fmnist
@pytest.mark.parametrize("holdout", [0, 300])
def test_a_run_without_public_images_reads_only_the_clients_partitions(monkeypatch, holdout):
    """The federation's training split records what is read; with holdout 0 only indices in some client's partition
    are (statistics, modes, warm start); the control with a hold-out shows that the recording sees more."""
    prepared = federation.prepare_federation

    def recording_federation(cfg):
        fed = prepared(cfg)
        fed.train = Split(fed.train.images.view(Recording), fed.train.labels, fed.train.source)
        return fed

    monkeypatch.setattr(federation, "prepare_federation", recording_federation)
    Recording.reads = []
    features = "public" if holdout else "random"
    cfg = load_config(SMOKE, [f"partition.public_holdout={holdout}", f'loss.features="{features}"',
                              "model.conditional=true", "model.modes=2", "train.warm_start=5", "train.rounds=1",
                              "train.batch_size=40", "train.local_steps=1", "train.sample_every=0",
                              "loss.feature_epochs=1"])  # fmt: skip
    transport = simulate.InProcess(cfg)
    from prismfl.fl.methods.registry import build

    transport.setup(build(cfg), None, QUIET["log"])
    fed = transport.ctx.fed
    clients = set(np.concatenate(fed.parts).tolist())
    read = _read_indices(len(fed.train.labels))
    assert read, "the recording saw no read"
    if holdout:
        assert read - clients == set(fed.public_idx.tolist())
    else:
        assert not len(fed.public_idx) and read <= clients
        assert fed.codes.max() == 2 * 10 - 1  # the federation's modes are in use


@needs_fmnist
def test_the_warm_start_trains_on_the_pooled_statistics(monkeypatch):
    cfg = load_config(SMOKE, ["partition.public_holdout=0", "train.warm_start=5", "train.rounds=1",
                              "train.sample_every=0"])  # fmt: skip
    seen = {}
    real = simulate.warm_start

    def spy(ctx, steps, pooled=None):
        seen["pooled"] = pooled
        return real(ctx, steps, pooled)

    monkeypatch.setattr(simulate, "warm_start", spy)
    transport = simulate.InProcess(cfg)
    from prismfl.fl.methods.registry import build

    method = build(cfg)
    setup = transport.setup(method, None, QUIET["log"])
    held = [c.stats for c in transport.clients.values()]
    union = combine_stats(held)
    assert seen["pooled"].count == union.count == sum(len(p) for p in transport.ctx.fed.parts)
    assert setup.warm_info["source"] == "the clients' pooled statistics"
    # the pooled statistics of what the clients' messages carry (variances in float16): Flower's server
    # decodes the same; the means are the union's
    sent = combine_stats([statistics_of_message(statistics_message(s), method.spec.codes) for s in held])
    assert all(torch.equal(a, b) for a, b in zip(seen["pooled"].mean + seen["pooled"].var, sent.mean + sent.var))
    assert all(torch.equal(a, b) for a, b in zip(seen["pooled"].mean, union.mean))


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (['loss.feature_data="fashion-mnist"', 'loss.features="public"'], "the clients' own dataset"),
        (['loss.feature_data="mnist"'], "set loss.features = 'public'"),
        (['loss.feature_data="imagenet"', 'loss.features="public"'], "loss.feature_data"),
        (['loss.features="public"', "partition.public_holdout=0"], "loss.feature_data = 'mnist'"),
        (["privacy.epsilon=4", "privacy.split=1"], r"privacy.split must be a finite number in \(0, 1\), got 1"),
    ],
)
def test_bad_public_data_settings_are_refused_with_one_line(overrides, says):
    with pytest.raises(ConfigError, match=says) as info:
        load_config(SMOKE, overrides)
    assert "\n" not in str(info.value)


@needs_fmnist
def test_a_public_feature_net_of_another_distribution(tmp_path):
    """loss.feature_data = "mnist": the net learns MNIST's digits (10 classes), every image of its training
    split; the run records that, and reads no FashionMNIST image outside the clients' partitions."""
    cfg = load_config(SMOKE, ['loss.features="public"', 'loss.feature_data="mnist"', "partition.public_holdout=0",
                              "loss.feature_epochs=1"])  # fmt: skip
    fed = federation.prepare_federation(cfg)
    net, meta, recipe = feature_nets.build_feature_net(cfg, fed, log=lambda *_: None)
    assert "4,000 images of mnist" in meta["trained_on"] and recipe["classes"] == 10
    assert len(fed.public_idx) == 0
    again = feature_nets.feature_net_from_recipe(cfg, recipe)  # a Flower message's process: from the cache alone
    x = fed.images(fed.parts[0][:4])
    assert all(torch.equal(a, b) for a, b in zip(net.extract(x), again.extract(x)))


@needs_fmnist
def test_the_set_up_traffic_of_a_run_without_public_images_is_counted(tmp_path):
    """The warm start at the server needs every client's feature statistics, the modes every client's
    moment sums: their bytes (payload, as Flower carries them) are recorded in the model's info and the
    report, beside the rounds' traffic."""
    from prismfl import modelfile, rundir
    from prismfl.fl.methods.registry import build

    cfg = load_config(SMOKE, ["train.warm_start=20", "train.rounds=1", "model.conditional=true", 'model.arch="mlp-up"',
                              "model.modes=2", "loss.codes_per_step=8", "train.batch_size=16"])  # fmt: skip
    out = simulate.train(cfg, tmp_path / "run", **QUIET)
    traffic = modelfile.load(out / "model.prism").info["setup_traffic"]
    # each client's statistics: (20 codes x D) means and variances, float32, per feature layer; its moment sums:
    # counts (10), sums (10 x 196) and outer products (10 x 196 x 196), float64; a little safestate framing each
    # each client's statistics: the rows of the codes it holds images of, means float32 and variances float16,
    # per feature layer; its moment sums: counts (10) and, for each class it holds, sums (196) and the outer
    # product's lower triangle (196 x 197 / 2), float64; a little safestate framing each
    state = rundir.load_checkpoint(out)["clients"]["clients"]
    stats = sum((4 + 2) * int((c["stats"]["class_counts"] != 0).sum()) * sum(m.shape[1] for m in c["stats"]["mean"])
                for c in state)  # fmt: skip
    held = (federation.prepare_federation(cfg).table > 0).sum(1)
    moments = 8 * sum(10 + n * (196 + 196 * 197 // 2) for n in held)
    assert stats + moments < traffic["up"] < stats + moments + 3 * 2 * 4096
    fitted = federation.prepare_federation(cfg).modes
    assert traffic["down"] == 3 * len(simulate.modes_message(fitted))
    assert 8 * 10 * 784 * 2 * 3 < traffic["down"]  # the means and bases of 10 classes, to 3 clients
    report = (out / "report.md").read_text()
    assert f"Set-up, before round 1: {traffic['up'] / 1e6:.2f} MB up" in report
    assert build(cfg).spec.codes == 20


def _stats(codes: int = 6):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(50, 1, 4, 4, generator=gen) * 3
    labels = torch.tensor([0, 2, 5] * 16 + [0, 2])
    return feature_stats(lambda x: [x.flatten(1), x.flatten(1)[:, :3] ** 2 * 1000], images, labels=labels,
                         num_classes=codes)  # fmt: skip


def test_a_statistics_message_carries_the_held_rows_means_exact_variances_in_float16():
    """Rows of codes without images are not sent and come back exactly zero; the means exactly (float32:
    pooling subtracts their squares), the variances within float16's precision (2**-11 of each value; the
    power-of-two scale keeps 1000x features in range). Pooled, the variances keep that precision even
    where a feature's mean is far above its spread."""
    stats = _stats()
    blob = statistics_message(stats)
    back = statistics_of_message(blob, 6)
    assert torch.equal(back.class_counts, stats.class_counts) and back.count == 50
    assert all(torch.equal(a, b) for a, b in zip(stats.mean, back.mean))
    for a, b in zip(stats.var, back.var):
        assert a.shape == b.shape and b.dtype == torch.float32
        assert torch.equal(b[[1, 3, 4]], torch.zeros_like(b[[1, 3, 4]]))
        assert bool(((a - b).abs() <= a.abs() * 2.0**-11 + 1e-30).all())
    assert statistics_message(back) == statistics_message(statistics_of_message(statistics_message(back), 6))
    # the tensors' bytes: 3 rows x (16 + 3) features, means float32 and variances float16, 2 scales in
    # float32, the class counts in float64 (3/8 of the float32 statistics' 6 x 19 x 2 x 4)
    header = int.from_bytes(blob[:8], "little")
    assert len(blob) - 8 - header == 3 * 19 * (4 + 2) + 2 * 4 + 6 * 8
    # a feature at 100 +- 0.01 (a class head's probability in small): its pooled variance to 2**-11
    one = [
        (torch.full((1, 1), 100.0 + d), n, torch.tensor([float(n)], dtype=torch.float64))
        for d, n in ((0.01, 3), (-0.02, 5))
    ]
    parts = [FeatureStats([mean], [torch.full((1, 1), 1e-4)], n, counts) for mean, n, counts in one]
    exact = combine_stats(parts).var[0]
    sent = combine_stats([statistics_of_message(statistics_message(p), 1) for p in parts]).var[0]
    assert float((sent - exact).abs() / exact) < 2.0**-10


def _tampered(blob: bytes, **changes) -> bytes:
    from prismfl import safestate

    tree = safestate.from_bytes(blob)
    tree.update(changes)
    return safestate.to_bytes(tree)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"var": [torch.zeros(3, 16, dtype=torch.float32), torch.zeros(3, 3, dtype=torch.float32)]}, "float16"),
        ({"mean": [torch.zeros(3, 16).half(), torch.zeros(3, 3).half()]}, "float32"),
        ({"class_counts": torch.zeros(6, dtype=torch.float64)}, "no class with images"),
        ({"class_counts": torch.tensor([16.0, 0, 17, 1, 0, 16], dtype=torch.float64)}, "a row per class"),
        ({"var": [torch.full((3, 16), -1.0).half(), torch.zeros(3, 3).half()]}, ">= 0"),
        ({"var_scale": torch.tensor([1.0], dtype=torch.float32)}, "one per layer"),
        ({"var_scale": torch.tensor([0.0, 1.0], dtype=torch.float32)}, "var_scale"),
        (
            {
                "mean": [torch.zeros(3, 17), torch.zeros(3, 3)],
                "var": [torch.zeros(3, 17).half(), torch.zeros(3, 3).half()],
            },
            "more than 114",
        ),
    ],
)
def test_a_bad_statistics_message_is_refused_before_it_is_expanded(change, says, monkeypatch):
    from prismfl.fl import client

    monkeypatch.setattr(client, "STATS_FEATURES_LIMIT", 6 * 19)  # the honest message's 6 codes x 19 features
    blob = _tampered(statistics_message(_stats()), **change)
    with pytest.raises(Exception, match=says) as info:
        statistics_of_message(blob, 6)
    assert type(info.value).__name__ in ("StateError", "ValueError")


def test_a_moments_message_is_exact_and_a_fifth_of_the_sums():
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28)).astype(np.uint8)
    sums = modes_mod.moment_sums(images, np.array([1, 3] * 20), 10, 1 / 255)
    assert all(np.array_equal(o, o.T) for o in sums["outer"])  # symmetric: its lower triangle is all it takes
    blob = moments_message(sums)
    back = moments_of_message(blob, 10, 196)
    assert all(np.array_equal(sums[key], back[key]) for key in sums)
    assert len(blob) < 0.11 * 8 * (10 + 10 * 196 + 10 * 196 * 196)  # 2 classes of 10, half of each outer product
    bad = _tampered(blob, counts=torch.tensor([0, 20, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.float64))
    with pytest.raises(ValueError, match="images can add up to"):
        moments_of_message(bad, 10, 196)
    with pytest.raises(ValueError, match="a row per class"):
        moments_of_message(_tampered(blob, counts=torch.ones(10, dtype=torch.float64)), 10, 196)
    with pytest.raises(ValueError, match="float64"):
        moments_of_message(_tampered(blob, sums=torch.zeros(2, 196)), 10, 196)
