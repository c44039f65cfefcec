"""Class-conditional generation (model.conditional): generator, per-class statistics and their private
release, the per-class loss, the model file's class shares, sampling by class, and the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_fmnist
from prismfl import modelfile
from prismfl.errors import ModelFileError
from prismfl.loss.matching import ConditionalMatching, FeatureStats, feature_stats, layer_weights, pooled_stats
from prismfl.model import masked
from prismfl.model.generators import ArchSpec, build_generator, count_weights
from prismfl.privacy import private_feature_stats, weak_classes

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


def _spec(name="mlp-up", classes=10):
    return ArchSpec(name, z_dim=8, width=16, channels=1, img_size=8, weight_seed=3, num_classes=classes)


# ---------------------------------------------------------------- generator


@pytest.mark.parametrize("name", ["mlp", "mlp-up"])
def test_conditional_generator_counts_its_class_inputs_and_uses_the_label(name):
    spec = _spec(name)
    net = build_generator(spec)
    assert masked.num_maskable(net) == count_weights(spec)
    assert count_weights(spec) - count_weights(_spec(name, 0)) == 10 * 16  # one input column per class
    masked.set_fixed_mask(net, torch.ones(masked.num_maskable(net), dtype=torch.bool))
    net.eval()
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    a, b = net(z, torch.tensor([0, 0, 0, 0])), net(z, torch.tensor([5, 5, 5, 5]))
    assert a.shape == (4, 1, 8, 8) and not torch.allclose(a, b)
    assert torch.allclose(net(z[:1], torch.tensor([0])), a[:1], atol=1e-6)  # per-sample norms: no batch dependence


def test_conditional_generator_refuses_missing_or_bad_labels():
    net = build_generator(_spec())
    z = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="needs one label per noise vector"):
        net(z)
    with pytest.raises(ValueError, match="class labels must be in 0..9"):
        net(z, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="not class-conditional"):
        build_generator(_spec(classes=0))(z, torch.tensor([0, 1]))


def test_conditional_is_for_the_mlp_generators_and_unconditional_specs_keep_their_bytes():
    with pytest.raises(ValueError, match="class-conditional generator is built for mlp and mlp-up"):
        ArchSpec("dcgan", num_classes=10).validate()
    with pytest.raises(ValueError, match="num_classes must be an integer"):
        ArchSpec("mlp", num_classes=-1).validate()
    assert "num_classes" not in ArchSpec("mlp").to_dict()  # model files written before stay byte-identical
    assert ArchSpec("mlp", num_classes=10).to_dict()["num_classes"] == 10


# ---------------------------------------------------------------- per-class statistics


def _extract(x):
    flat = x.flatten(1)
    return [flat, flat.abs()[:, :3]]


def test_per_class_statistics_are_each_class_subsets_statistics():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(50, 1, 2, 2, generator=gen)
    labels = torch.tensor([0, 2] * 20 + [2] * 10)
    stats = feature_stats(_extract, images, batch=7, labels=labels, num_classes=3)
    assert stats.class_counts.tolist() == [20.0, 0.0, 30.0] and stats.count == 50
    for c in (0, 2):
        alone = feature_stats(_extract, images[labels == c])
        for got, want in zip(stats.of_class(c).targets(), alone.targets()):
            assert torch.allclose(got, want, atol=1e-6)
    assert all(float(t.abs().sum()) == 0 for t in stats.of_class(1).targets())  # an absent class: zeros


def test_per_class_statistics_from_sums_on_another_device_than_the_counts():
    # on a GPU the sums live on the device and the counts on the CPU (the first CUDA run failed here);
    # the "meta" device stands in for the GPU: a mixed-device operation raises the same error
    from prismfl.loss.matching import stats_from_sums

    sums = [torch.zeros(3, 4, dtype=torch.float64, device="meta")]
    stats = stats_from_sums(sums, sums, torch.tensor([1.0, 2.0, 0.0]))
    assert stats.mean[0].device.type == "meta" and stats.var[0].device.type == "meta"
    assert stats.class_counts.device.type == "cpu" and stats.count == 3
    # and the per-class loss built from them (its class shares are made on the CPU)
    loss = ConditionalMatching(stats_from_sums(sums, sums, torch.tensor([2.0, 2.0, 3.0])), codes_per_step=2)
    assert {t.device.type for t in loss.targets + loss.weights} == {"meta"}
    assert loss.labels(4, "meta", torch.Generator().manual_seed(0)).device.type == "meta"


def test_per_class_private_release_is_the_closed_form():
    """Each image's clipped, scaled vector goes to its class's block; every block and count gets noise of
    std z sqrt(2L + 1), drawn in the order sums, squares, counts."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(40, 1, 2, 2, generator=gen)
    labels = torch.tensor([0, 1, 3, 3] * 10)
    clip = [1.5, 0.8]
    release = private_feature_stats(_extract, images, clip, 4.0, 1e-5, generator=torch.Generator().manual_seed(9),
                                    labels=labels, num_classes=4)  # fmt: skip
    z = release.noise_multiplier
    std = z * math.sqrt(2 * 2 + 1)
    assert release.sensitivity == pytest.approx(math.sqrt(5))
    noise = torch.Generator().manual_seed(9)
    scaled = [f.double() * torch.clamp(c / f.double().norm(dim=1, keepdim=True), max=1.0) / c
              for f, c in zip(_extract(images), clip)]  # fmt: skip
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    sums = [onehot.T @ f for f in scaled]
    squares = [onehot.T @ (f * f) for f in scaled]
    sums = [s + std * torch.randn(s.shape, generator=noise, dtype=torch.float64) for s in sums]
    squares = [q + std * torch.randn(q.shape, generator=noise, dtype=torch.float64) for q in squares]
    counts = onehot.sum(0) + std * torch.randn(4, generator=noise, dtype=torch.float64)
    assert torch.allclose(release.stats.class_counts, counts)  # as released: the server sums them unclamped
    for c in range(4):
        if counts[c] < 1:
            continue
        mean = [clip[i] * sums[i][c] / counts[c] for i in range(2)]
        var = [(clip[i] ** 2 * squares[i][c] / counts[c] - mean[i] ** 2).clamp_min(0) for i in range(2)]
        got = release.stats.of_class(c)
        for g, w in zip(got.mean + got.var, mean + var):
            assert torch.allclose(g.double(), w, rtol=1e-5, atol=1e-5)


def test_one_image_moves_one_class_block_by_at_most_the_sensitivity():
    gen = torch.Generator().manual_seed(2)
    images = 5 * torch.randn(30, 1, 2, 2, generator=gen)
    labels = torch.arange(30) % 3
    clip = [1.0, 0.5]
    full = private_feature_stats(_extract, images, clip, math.inf, 1e-5, labels=labels, num_classes=3)
    less = private_feature_stats(_extract, images[1:], clip, math.inf, 1e-5, labels=labels[1:], num_classes=3)

    # rebuild the released sums (clip units) from means and counts: image 0 is of class 0, the others' blocks stay
    def sums(r, c):
        n = float(r.stats.class_counts[c])
        means = [n * m[c].double() / k for m, k in zip(r.stats.mean, clip)]
        seconds = [n * (v[c].double() + m[c].double() ** 2) / k**2 for m, v, k in zip(r.stats.mean, r.stats.var, clip)]
        return torch.cat([*means, *seconds, torch.tensor([n]).double()])

    for c in (1, 2):
        assert torch.allclose(sums(full, c), sums(less, c), atol=1e-5)
    moved = float((sums(full, 0) - sums(less, 0)).norm())
    assert 0 < moved <= math.sqrt(2 * 2 + 1) + 1e-5


def test_weak_classes_warn_when_the_noise_would_swamp_a_class():
    sums = [torch.tensor([[100.0, 0.0], [1.0, 0.0], [0.0, 0.0]])]
    counts = torch.tensor([100.0, 1.0, 0.0])
    out = weak_classes(sums, counts, std=2.0)  # noise norm 2 sqrt(2) = 2.8: above class 1's 1, below class 0's 100
    assert len(out) == 1 and out[0].startswith("class 1: 1 images") and "x2.8" in out[0]
    assert weak_classes(sums, counts, 2.0, ["a", "b", "c"])[0].startswith("b: 1 images")
    # with modes the blocks are (class, mode) codes, named as such, not "class N" by the code's index
    modes = ["T-shirt, mode 1", "T-shirt, mode 2", "Trouser, mode 1"]
    assert weak_classes(sums, counts, 2.0, modes)[0].startswith("T-shirt, mode 2: 1 images")
    assert weak_classes(sums, counts, std=0.0) == []


# ---------------------------------------------------------------- the per-class loss


def _class_stats():
    mean = [torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])]
    var = [torch.tensor([[0.5, 0.5], [0.0, 0.0], [2.0, 1.0]])]
    return FeatureStats(mean, var, 40, torch.tensor([10.0, 0.0, 30.0], dtype=torch.float64))


def test_conditional_loss_weights_each_held_class_by_its_share_on_the_pooled_layer_scale():
    loss = ConditionalMatching(_class_stats(), "variance")
    assert loss.classes == [0, 2] and loss.shares == {0: 0.25, 2: 0.75}
    pooled = pooled_stats(_class_stats(), loss.shares)
    # mixture by hand: mean 0.25 [1, 2] + 0.75 [3, -1] = [2.5, -0.25]; E[f^2] = 0.25 [1.5, 4.5] + 0.75 [11, 2]
    assert torch.allclose(pooled.mean[0], torch.tensor([2.5, -0.25]))
    assert torch.allclose(pooled.var[0], torch.tensor([8.625 - 6.25, 2.625 - 0.0625]))
    scale = layer_weights(pooled, "variance")
    # stacked: one (classes, 1) column per statistic (the mean's, then the variance's)
    assert [w.shape for w in loss.weights] == [(2, 1), (2, 1)]
    assert torch.cat(loss.weights).flatten().tolist() == pytest.approx(
        [0.25 * float(scale[0]), 0.75 * float(scale[0]), 0.25 * float(scale[1]), 0.75 * float(scale[1])]
    )
    assert torch.equal(loss.targets[0], torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    assert loss.labels(8).tolist() == [0, 2, 0, 2, 0, 2, 0, 2]
    with pytest.raises(ValueError, match="raise train.batch_size to at least 4"):
        loss.labels(3)


def test_conditional_loss_is_zero_with_zero_gradient_at_the_targets():
    loss = ConditionalMatching(_class_stats(), "variance")
    # class 0's group: mean [1, 2], unbiased variance 0.5; class 2's: mean [3, -1], variances [2, 1]
    g0 = torch.tensor([[1.5, 2.5], [0.5, 1.5]])
    g2 = torch.tensor([[3 + 1.0, -1 + 1 / 2**0.5], [3 - 1.0, -1 - 1 / 2**0.5]])
    fake = torch.stack([g0[0], g2[0], g0[1], g2[1]]).requires_grad_(True)
    surrogate, value = loss([fake], None, loss.labels(4))
    surrogate.backward()
    assert value == pytest.approx(0.0, abs=1e-10)
    assert float(fake.grad.abs().max()) < 1e-6
    with pytest.raises(ValueError, match="needs the class of every generated image"):
        loss([fake], None, None)


def test_conditional_loss_with_no_class_above_the_noise_is_a_clear_error():
    with pytest.raises(ValueError, match="no class has at least 50 images"):
        ConditionalMatching(_class_stats(), min_count=50)


# ---------------------------------------------------------------- model file and sampling


def _model(shares=None):
    spec = _spec().validate()
    mask = torch.rand(count_weights(spec), generator=torch.Generator().manual_seed(0)) < 0.5
    return modelfile.PrismModel(spec, mask, {"dataset": "fashion-mnist"}, shares or [0.1] * 10)


def test_conditional_model_file_round_trips_its_class_shares():
    model = _model([0.0, 0.5] + [0.0625] * 8)
    data = modelfile.to_bytes(model)
    back = modelfile.from_bytes(data)
    assert back.spec == model.spec and back.class_shares == model.class_shares
    assert torch.equal(back.mask, model.mask)
    assert len(data) < (count_weights(model.spec) + 7) // 8 + 2048


def _rewrite(data: bytes, edit) -> bytes:
    """The file with its JSON header edited and the checksum recomputed (a well-formed but wrong file)."""
    import hashlib

    magic, version, head_len = modelfile._PREFIX.unpack_from(data)
    header = json.loads(data[modelfile._PREFIX.size : modelfile._PREFIX.size + head_len])
    edit(header)
    head = json.dumps(header).encode()
    body = modelfile._PREFIX.pack(magic, version, len(head)) + head + data[modelfile._PREFIX.size + head_len : -32]
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda h: h.update(class_shares=[0.2] * 10), "must sum to 1"),
        (lambda h: h.update(class_shares=[0.5, 0.5]), "a list of 10 numbers"),
        (lambda h: h.update(class_shares=[-0.1, 0.2] + [0.1125] * 8), "finite numbers >= 0"),
        (lambda h: h.pop("class_shares"), "needs class_shares"),
        (lambda h: h["arch"].update(num_classes=0), "written only for a conditional model"),
        (lambda h: h["arch"].update(num_classes=10**6), "num_classes must be an integer"),
    ],
)
def test_conditional_model_file_with_bad_class_fields_is_refused(edit, needle):
    with pytest.raises(ModelFileError, match=needle):
        modelfile.from_bytes(_rewrite(modelfile.to_bytes(_model()), edit))


def test_unconditional_model_file_refuses_class_shares():
    spec = _spec(classes=0).validate()
    plain = modelfile.PrismModel(spec, torch.zeros(count_weights(spec), dtype=torch.bool))
    data = modelfile.to_bytes(plain)
    assert b"num_classes" not in data and b"class_shares" not in data
    with pytest.raises(ModelFileError, match="belong to a conditional model"):
        modelfile.from_bytes(_rewrite(data, lambda h: h.update(class_shares=[1.0])))


def test_sampling_draws_labels_from_the_shares_or_takes_them():
    net = modelfile.materialize(_model([0.0, 0.75, 0.25] + [0.0] * 7))
    images, labels = modelfile.sample_labelled(net, 400, seed=3)
    again, labels2 = modelfile.sample_labelled(net, 400, seed=3)
    assert torch.equal(images, again) and torch.equal(labels, labels2)
    assert set(labels.tolist()) == {1, 2} and abs(float((labels == 1).float().mean()) - 0.75) < 0.08
    asked = modelfile.per_class_labels(10, 2)
    images, labels = modelfile.sample_labelled(net, 0, seed=3, labels=asked)
    assert images.shape == (20, 1, 8, 8) and torch.equal(labels, asked)
    assert not torch.equal(again[labels2 == 1][0], again[labels2 == 1][1])
    spec = _spec(classes=0).validate()
    plain = modelfile.materialize(modelfile.PrismModel(spec, torch.ones(count_weights(spec), dtype=torch.bool)))
    with pytest.raises(ValueError, match="not class-conditional"):
        modelfile.sample_labelled(plain, 2, labels=torch.tensor([0, 1]))


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    from prismfl.config import load_config
    from prismfl.fl import simulate

    out = tmp_path_factory.mktemp("runs") / "conditional"
    cfg = load_config(SMOKE, ["model.conditional=true", 'model.arch="mlp-up"'])
    simulate.train(cfg, out, log=lambda *_: None)
    return out


@needs_fmnist
def test_conditional_run_stores_the_clients_class_shares(conditional_run):
    from prismfl import rundir
    from prismfl.config import load_config
    from prismfl.data import federation

    model = modelfile.load(conditional_run / "model.prism")
    cfg = load_config(SMOKE, ["model.conditional=true", 'model.arch="mlp-up"'])
    table = federation.prepare_federation(cfg).table
    assert model.spec.num_classes == 10
    assert model.class_shares == pytest.approx((table.sum(0) / table.sum()).tolist())
    state = rundir.load_checkpoint(conditional_run)
    assert state["server"]["class_shares"].dtype == torch.float64


@needs_fmnist
def test_cli_sample_by_class_and_per_class(conditional_run, tmp_path, run_cli):
    code, out, err = run_cli("sample", str(conditional_run), "--per-class", "3", "--out", str(tmp_path / "p.npz"))
    assert code == 0, err
    with np.load(tmp_path / "p.npz", allow_pickle=False) as f:
        assert f["images"].shape == (30, 1, 28, 28) and f["labels"].tolist() == sorted(list(range(10)) * 3)
        assert f["images"].min() >= -1 and f["images"].max() <= 1
    code, out, err = run_cli("sample", str(conditional_run), "--class", "sandal", "--n", "5",
                             "--out", str(tmp_path / "s.npz"))  # fmt: skip
    assert code == 0 and "of class sandal" in out, err
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        assert f["labels"].tolist() == [5] * 5
    code, _, err = run_cli("sample", str(conditional_run), "--per-class", "4", "--out", str(tmp_path / "g.png"))
    assert code == 0 and (tmp_path / "g.png").is_file()
    code, _, err = run_cli("sample", str(conditional_run), "--class", "Sock", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "not a class of this model: T-shirt, Trouser" in err
    code, _, err = run_cli("sample", str(conditional_run), "--class", "1", "--per-class", "2",
                           "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert code == 2 and "not both" in err


@needs_fmnist
def test_cli_sample_by_class_needs_a_conditional_model(tmp_path, run_cli):
    spec = _spec(classes=0).validate()
    modelfile.save(modelfile.PrismModel(spec, torch.ones(count_weights(spec), dtype=torch.bool)), tmp_path / "m.prism")
    code, _, err = run_cli("sample", str(tmp_path / "m.prism"), "--class", "1", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "need a class-conditional model" in err


def test_clients_report_exact_counts_without_privacy_and_the_released_ones_with_it():
    from prismfl.fl.client import ClientRuntime, reported_counts

    stats = FeatureStats(
        [torch.zeros(3, 2)], [torch.zeros(3, 2)], 10, torch.tensor([2.6, 0.0, 6.6], dtype=torch.float64)
    )
    exact = np.array([2, 0, 8])
    assert reported_counts(ClientRuntime(0, stats), exact) == ([2, 0, 8], [2.6, 0.0, 6.6])
    assert reported_counts(ClientRuntime(0, stats, {"epsilon": 1.0}), exact, True) == ([3, 0, 7], [2.6, 0.0, 6.6])
    plain = FeatureStats([torch.zeros(2)], [torch.zeros(2)], 10)
    assert reported_counts(ClientRuntime(0, plain), exact) == ([2, 0, 8], None)
    # an unconditional release holds one noisy count: the row is that total, never the exact classes
    noisy = FeatureStats([torch.zeros(2)], [torch.zeros(2)], 11)
    assert reported_counts(ClientRuntime(0, noisy, {"epsilon": 1.0}), exact, True) == ([11], None)
    assert reported_counts(ClientRuntime(0, None), exact, True) == ([], None)  # holds no data for the method


def test_the_server_class_table_from_reported_rows():
    from prismfl.errors import PrismError
    from prismfl.fl.client import NOISY_TOTAL, class_table_of

    table, names = class_table_of([[1, 2], [], [3, 0]], ["a", "b"])
    assert table.tolist() == [[1, 2], [0, 0], [3, 0]] and names == ["a", "b"]
    table, names = class_table_of([[7], [], [5]], ["a", "b"])
    assert table.tolist() == [[7], [0], [5]] and names == [NOISY_TOTAL]
    for bad in ([[1, 2], [3]], [[1, 2, 3], [1, 2, 3]]):
        with pytest.raises(PrismError, match="different lengths"):
            class_table_of(bad, ["a", "b"])


def test_flower_server_sums_the_class_counts_the_clients_report():
    from prismfl.flower.replies import SetupReply
    from prismfl.flower.server_app import class_counts

    def reply(counts):  # (the length of each list is checked against the model's codes when the reply is read)
        return SetupReply(0, [], "s", {}, b"k" * 32, statistics_class_counts=counts)

    assert class_counts([reply([1.0, 2.0]), reply([0.5, 0.5]), reply(None)]) == [1.5, 2.5]
    assert class_counts([reply(None), reply(None)]) is None


def test_pooled_features_are_block_means_of_the_maps():
    from prismfl.loss.features import SmallCNN

    net = SmallCNN(1, 4, 10)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    plain = net.extract(x)
    net.pool = 2
    pooled = net.extract(x)
    assert [f.shape[1] for f in plain] == [784, 4 * 784, 4 * 784, 8 * 196, 8 * 196, 16 * 49, 16 * 49]
    assert [f.shape[1] for f in pooled] == [196, 4 * 196, 4 * 196, 8 * 49, 8 * 49, 16 * 16, 16 * 16]  # 7 -> 4: ceil
    blocks = x.reshape(3, 1, 14, 2, 14, 2).mean(dim=(3, 5)).flatten(1)  # the pixels, 2x2 block means
    assert torch.allclose(pooled[0], blocks, atol=1e-6)


@needs_fmnist
def test_private_conditional_run_releases_noisy_class_counts(tmp_path):
    from prismfl import rundir
    from prismfl.config import load_config
    from prismfl.data import federation
    from prismfl.fl import simulate

    cfg = load_config(SMOKE, ["model.conditional=true", "privacy.epsilon=8.0", "train.rounds=1"])
    simulate.train(cfg, tmp_path / "dp", log=lambda *_: None)
    state = rundir.load_checkpoint(tmp_path / "dp")
    exact = federation.prepare_federation(cfg).table
    released = torch.stack([c["stats"]["class_counts"] for c in state["clients"]["clients"]])
    assert released.shape == exact.shape and not torch.equal(released, torch.from_numpy(exact).double())
    assert float((released - torch.from_numpy(exact)).abs().max()) < 6 * 12  # noise std z sqrt(2L + 1), L = 7
    shares = state["server"]["class_shares"]
    assert torch.allclose(shares, released.sum(0) / released.sum(), atol=1e-12)  # the released counts, summed
    table = (tmp_path / "dp" / "partition.txt").read_text()
    assert " ".join(str(int(v)) for v in exact[0]) not in " ".join(table.split())  # the exact table is not shown


@needs_fmnist
def test_private_unconditional_run_shows_only_noisy_totals(tmp_path):
    """An unconditional release holds one noisy count: partition.txt shows it per client, and neither
    the exact class counts nor the exact totals (issue 13: they were sent exactly at set-up)."""
    from prismfl.config import load_config
    from prismfl.data import federation
    from prismfl.fl import simulate
    from prismfl.fl.client import NOISY_TOTAL

    cfg = load_config(SMOKE, ["privacy.epsilon=8.0", "train.rounds=1"])
    simulate.train(cfg, tmp_path / "dp", log=lambda *_: None)
    exact = federation.prepare_federation(cfg).table
    lines = (tmp_path / "dp" / "partition.txt").read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("client"))
    assert NOISY_TOTAL.split()[0] in lines[head] and "T-shirt" not in lines[head]
    totals = [int(line.split()[1]) for line in lines[head + 1 : head + 4]]
    assert totals != exact.sum(axis=1).tolist()  # noisy (std about 12 here)
    assert all(abs(t - e) < 6 * 12 for t, e in zip(totals, exact.sum(axis=1)))


@needs_fmnist
def test_cli_evaluate_a_conditional_run(conditional_run, tmp_path, run_cli):
    from test_run import _write_small_fmnist

    root = _write_small_fmnist(tmp_path, 1200, 300)
    code, out, err = run_cli("evaluate", str(conditional_run / "model.prism"), "--n", "200", "--data-root", str(root),
                             "--synthetic", "300", "--out", str(tmp_path / "c.json"))  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "c.json").read_text())
    assert r["conditional"] is True and 0 <= r["label_agreement"] <= 1 and len(r["per_class_fid"]) == 10
    assert 0 <= r["tstr_accuracy"] <= 1 and r["tstr_images"] == 300 and len(r["tstr_per_class"]) == 10
    assert "300 generated labelled images" in r["protocol"]["train_on_synthetic"]
    assert "train-on-synth" in out and "FID per class" in out
    code, _, err = run_cli(
        "evaluate", str(conditional_run), "--n", "200", "--data-root", str(root), "--synthetic", "300"
    )
    report = (conditional_run / "report.md").read_text()
    assert code == 0 and "one row per class" in report and "| Sandal |" in report and "tstr_accuracy" in report
    code, _, err = run_cli("evaluate", str(conditional_run / "model.prism"), "--n", "200", "--data-root", str(root),
                           "--synthetic", "1")  # fmt: skip
    assert code == 2 and "--synthetic must be 0 or in 2.." in err
    code, _, err = run_cli("evaluate", "real", "--epsilon", "1")
    assert code == 2 and "--epsilon is for the pca-gaussian reference" in err


def test_a_means_only_release_has_the_smaller_sensitivity_and_no_second_moments():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(40, 1, 2, 2, generator=gen)
    labels = torch.tensor([0, 1, 3, 3] * 10)
    clip = [1.5, 0.8]
    release = private_feature_stats(_extract, images, clip, 4.0, 1e-5, generator=torch.Generator().manual_seed(9),
                                    labels=labels, num_classes=4, second=False)  # fmt: skip
    assert release.sensitivity == pytest.approx(math.sqrt(2 + 1))
    std = release.noise_multiplier * math.sqrt(3)
    noise = torch.Generator().manual_seed(9)
    scaled = [f.double() * torch.clamp(c / f.double().norm(dim=1, keepdim=True), max=1.0) / c
              for f, c in zip(_extract(images), clip)]  # fmt: skip
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    sums = [onehot.T @ f + std * torch.randn(4, f.shape[1], generator=noise, dtype=torch.float64) for f in scaled]
    counts = onehot.sum(0) + std * torch.randn(4, generator=noise, dtype=torch.float64)  # no squares drawn between
    assert torch.allclose(release.stats.class_counts, counts)
    for c in range(4):
        if counts[c] >= 1:
            got = release.stats.of_class(c)
            for i in range(2):
                assert torch.allclose(got.mean[i].double(), clip[i] * sums[i][c] / counts[c], atol=1e-5)
                assert float(got.var[i].abs().max()) == 0.0


def test_means_only_loss_matches_means_and_weighs_layers_by_their_public_scale():
    from prismfl.loss.matching import MeanVarMatching

    stats = FeatureStats([torch.tensor([1.0, 2.0]), torch.tensor([0.5])], [torch.zeros(2), torch.zeros(1)], 10)
    loss = MeanVarMatching(stats, "mean", scales=[2.0, 0.5])
    assert len(loss.targets) == 2 and [float(w) for w in loss.weights] == pytest.approx([0.25, 4.0])
    fake = [torch.tensor([[1.0, 2.0], [1.0, 2.0]], requires_grad=True), torch.tensor([[0.0], [1.0]])]
    surrogate, value = loss(fake)
    assert value == pytest.approx(0.0)  # the means agree; the spread of the second layer is not matched


@pytest.mark.parametrize("moment", ["variance", "mean"])
def test_conditional_fake_statistics_are_each_groups_own(moment):
    loss = ConditionalMatching(_class_stats(), moment)
    gen = torch.Generator().manual_seed(3)
    fake = [torch.randn(8, 2, generator=gen)]
    labels = torch.tensor([0, 2, 2, 0, 2, 0, 2, 2])  # groups of 3 and 5
    got = loss.fake_stats(fake, labels)
    groups = [fake[0][labels == c] for c in (0, 2)]  # stacked: one (classes, D) tensor per statistic
    want = [torch.stack([f.mean(0) for f in groups])]
    if moment != "mean":
        want.append(torch.stack([f.var(0, unbiased=True) for f in groups]))
    assert len(got) == len(want) and all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))


def test_a_checkpoint_whose_class_counts_do_not_fit_its_statistics_is_refused():
    from prismfl.fl.simulate import restore_clients
    from prismfl.safestate import StateError

    state = {"k": 0, "stats": {"mean": [torch.zeros(3, 2)], "var": [torch.zeros(3, 2)], "count": 5,
                               "class_counts": torch.ones(4, dtype=torch.float64)},
             "privacy": None, "state": {"optimizer": None, "tracker": {"vectors": [], "optimizer": None}},
             "held_round": 0, "replica": None, "own": None}  # fmt: skip
    with pytest.raises(StateError, match="client 0: its statistics: .*inconsistent shapes"):
        restore_clients({"clients": [state], "replicas": {}}, 1e-5)
    state["stats"]["class_counts"] = torch.ones(3, dtype=torch.float64)
    assert restore_clients({"clients": [state], "replicas": {}}, 1e-5)[0].stats.class_counts.tolist() == [1, 1, 1]


@needs_fmnist
def test_cli_info_shows_the_classes(conditional_run, run_cli):
    code, out, err = run_cli("info", str(conditional_run / "model.prism"))
    assert code == 0 and "classes=10 (conditional)" in out and out.count("class shares: ") == 1


def test_conditional_config_needs_two_images_of_every_class_per_batch():
    from prismfl.config import load_config
    from prismfl.errors import ConfigError

    with pytest.raises(ConfigError, match="train.batch_size >= 20"):
        load_config(SMOKE, ["model.conditional=true", "train.batch_size=16"])


def test_a_client_with_no_class_above_the_noise_is_a_clear_error():
    from prismfl.config import load_config
    from prismfl.errors import PrismError
    from prismfl.fl.client import ClientRuntime

    cfg = load_config(SMOKE, ["model.conditional=true"])
    client = ClientRuntime(4, _class_stats(), {"noise_std": 100.0, "clip": [1.0]})
    with pytest.raises(PrismError, match="client 4: no class has at least 300 images"):
        client.loss(cfg, "cpu")


@needs_fmnist
def test_train_on_synthetic_judges_images_of_another_size_at_the_datasets(monkeypatch):
    from prismfl.eval import classifier

    calls = {}

    def fake_train(net, images, labels, **kwargs):
        calls["shape"] = tuple(images.shape)
        return net.eval()

    monkeypatch.setattr(classifier, "train_classifier", fake_train)
    monkeypatch.setattr(classifier, "domain_classifier", lambda *a, **k: (None, {"test_accuracy": 0.9}))
    r = classifier.train_on_synthetic(torch.zeros(6, 1, 32, 32), torch.arange(6) % 3, "fashion-mnist")
    assert calls["shape"] == (6, 1, 28, 28) and 0 <= r["tstr_accuracy"] <= 1


def test_resume_accepts_a_checkpoint_written_before_the_new_config_keys(tmp_path, monkeypatch):
    from prismfl import rundir
    from prismfl.config import load_config
    from prismfl.errors import PrismError

    cfg = load_config(SMOKE)
    old = cfg.to_dict()
    del old["model"]["conditional"], old["loss"]["pool"]  # a checkpoint of the version before this change
    (tmp_path / rundir.CHECKPOINT).write_bytes(b"x")
    monkeypatch.setattr(rundir, "load_checkpoint", lambda out: {"config": old, "transport": "simulator"})
    monkeypatch.setattr(rundir, "check_progress", lambda state, cfg: None)  # (the rest of the checkpoint)
    assert rundir.check(tmp_path, cfg, resume=True, transport="simulator")["config"] is old
    with pytest.raises(PrismError, match="configuration differs"):
        rundir.check(tmp_path, load_config(SMOKE, ["train.rounds=9"]), resume=True, transport="simulator")


def test_resume_accepts_a_checkpoint_that_holds_retired_keys_at_their_kept_values(tmp_path, monkeypatch):
    from prismfl import rundir, safestate
    from prismfl.config import RETIRED, load_config

    cfg = load_config(SMOKE)
    old = cfg.to_dict()
    for key, kept in RETIRED.items():  # a checkpoint written before the keys were retired records them all
        section, name = key.split(".")
        old[section][name] = kept
    (tmp_path / rundir.CHECKPOINT).write_bytes(b"x")
    monkeypatch.setattr(rundir, "load_checkpoint", lambda out: {"config": old, "transport": "simulator"})
    monkeypatch.setattr(rundir, "check_progress", lambda state, cfg: None)  # (the rest of the checkpoint)
    assert rundir.check(tmp_path, cfg, resume=True, transport="simulator")["config"] is old
    assert old["train"]["final_mask"] == "mode"  # (read, not changed)
    old["train"]["final_mask"] = "sample"  # what this prismfl can no longer run
    with pytest.raises(safestate.StateError, match="train.final_mask = 'sample' was retired"):
        rundir.check(tmp_path, cfg, resume=True, transport="simulator")


@pytest.mark.parametrize("moment", ["variance", "mean"])
def test_conditional_loss_value_and_gradient_are_the_share_weighted_sum_of_per_class_losses(moment):
    """The stacked loss against its definition written out class by class: L = sum_c share_c * 1/2 sum_j
    scale_j ||target_jc - stat_jc(fake of class c)||^2, its gradient by autograd on that sum."""
    loss = ConditionalMatching(_class_stats(), moment)
    scale = layer_weights(pooled_stats(_class_stats(), loss.shares), moment)
    gen = torch.Generator().manual_seed(5)
    fake = torch.randn(8, 2, generator=gen)
    labels = torch.tensor([0, 2, 2, 0, 2, 0, 2, 2])
    a = fake.clone().requires_grad_(True)
    surrogate, value = loss([a], None, labels)
    surrogate.backward()
    b = fake.clone().requires_grad_(True)
    want = 0.0
    for c in (0, 2):
        f = b[labels == c]
        stats = [f.mean(0)] + {"variance": [f.var(0, unbiased=True)], "mean": []}[moment]
        targets = _class_stats().of_class(c).targets(moment)
        want = want + loss.shares[c] * 0.5 * sum(w * ((t - s) ** 2).sum() for w, t, s in zip(scale, targets, stats))
    want.backward()
    assert value == pytest.approx(float(want.detach()), rel=1e-5)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
