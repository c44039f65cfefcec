import pytest
import torch

from prismfl.cache import cached_state_dict
from prismfl.errors import ConfigError, ModelFileError
from prismfl.loss import features
from prismfl.loss.matching import FeatureStats, MeanVarMatching, feature_stats, layer_weights
from prismfl.loss.trackers import TrackerState


def test_feature_stats_exact():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    s = feature_stats(lambda b: [b], x, batch=1)
    assert s.mean[0].tolist() == [2.0, 4.0]
    assert s.var[0].tolist() == [1.0, 4.0]  # biased variance
    assert s.second[0].tolist() == [5.0, 20.0]
    assert s.count == 2


def test_mean_var_loss_value_and_gradient_hand_computed():
    real = FeatureStats([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 4.0])], 10)
    loss = MeanVarMatching(real, moment="variance")
    fake = torch.tensor([[0.0, 0.0], [2.0, 2.0]], requires_grad=True)
    # the layer's weights: 1 / (1 + 4) for the mean gap, 1 / (1^2 + 4^2) for the variance gap
    # fake mean [1, 1], fake var [1, 1]: L = 1/2 (0^2 + 1^2) / 5 + 1/2 (0^2 + 3^2) / 17
    surrogate, value = loss([fake])
    assert value == pytest.approx(0.5 / 5 + 4.5 / 17)
    surrogate.backward()
    # dL/dfake_ij = (mu~_j - mu_j)/B / 5 + (var~_j - var_j) * 2 (x_ij - mu~_j)/B / 17 with B = 2
    expected = torch.tensor([[0.0, 0.5 / 5 + (-3.0) * (-1.0) / 17], [0.0, 0.5 / 5 + (-3.0) * 1.0 / 17]])
    assert fake.grad.flatten().tolist() == pytest.approx(expected.flatten().tolist())


def test_layer_normalisation_weights():
    real = FeatureStats([torch.zeros(2), torch.zeros(3)], [torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0, 4.0])], 5)
    w = layer_weights(real, "variance")
    assert [float(x) for x in w] == pytest.approx([1 / 4, 1 / 8, 1 / 10, 1 / 24])


def test_an_unknown_moment_is_refused():
    real = FeatureStats([torch.tensor([2.0])], [torch.tensor([1.0])], 5)
    assert MeanVarMatching(real, "variance").targets[1].tolist() == [1.0]
    with pytest.raises(ValueError, match="unknown moment"):
        MeanVarMatching(real, "second")


def test_ema_tracker_smooths_and_persists():
    real = FeatureStats([torch.tensor([0.0])], [torch.tensor([0.0])], 1)
    loss = MeanVarMatching(real, "variance", tracker="ema", tracker_beta=0.5)
    tracker = TrackerState()
    loss([torch.tensor([[2.0], [2.0]])], tracker)  # gaps: mean -2, var 0 -> tracker starts at the gap
    assert tracker.vectors[0].tolist() == [-2.0]
    loss([torch.tensor([[4.0], [4.0]])], tracker)  # new gap -4 -> 0.5 * -2 + 0.5 * -4
    assert tracker.vectors[0].tolist() == [-3.0]
    again = TrackerState.from_state_dict(tracker.state_dict())
    assert again.vectors[0].tolist() == [-3.0]


def test_random_cnn_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = features.random_cnn(1, 4, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = features.random_cnn(1, 4, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    feats = a.extract(torch.zeros(2, 1, 28, 28))
    assert len(feats) == 7 and feats[0].shape == (2, 784)


def test_vgg19bn_loads_a_torchvision_style_state_dict(tmp_path):
    net = features.VGG19BNFeatures()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    state = {k: v for k, v in state.items() if k.startswith("features.")}
    state["classifier.0.weight"] = torch.zeros(4096, 25088)[:1]  # classifier keys are ignored
    torch.save(state, tmp_path / "vgg19_bn.pth")
    loaded = features.load_vgg19bn(tmp_path / "vgg19_bn.pth")
    assert torch.equal(loaded.features[0].weight, state["features.0.weight"])
    feats = loaded.extract(torch.zeros(2, 1, 32, 32))
    assert len(feats) == 16 and sum(f.shape[1] for f in feats) == 303_104  # METHOD.md §3: all 16 ReLUs at 32x32


def test_vgg19bn_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        features.load_vgg19bn(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="cannot read"):
        features.load_vgg19bn(tmp_path / "junk.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ModelFileError, match="not a vgg19_bn"):
        features.load_vgg19bn(tmp_path / "partial.pth")


def test_cache_rebuilds_on_checksum_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISMFL_CACHE", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.ones(3)}, {"trained_on": "test"}

    s1, m1 = cached_state_dict("net", {"a": 1}, build, log=lambda *_: None)
    s2, _ = cached_state_dict("net", {"a": 1}, build, log=lambda *_: None)
    assert len(calls) == 1 and torch.equal(s1["w"], s2["w"])
    (tmp_path / m1["file"]).write_bytes(b"tampered")
    logs = []
    cached_state_dict("net", {"a": 1}, build, log=logs.append)
    assert len(calls) == 2 and "checksum" in logs[0]


def test_small_cnn_class_layer():
    net = features.random_cnn(1, 4, seed=0)
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = net.extract(x)
    net.class_probs = True
    more = net.extract(x)
    assert len(more) == len(plain) + 1 and all(torch.equal(a, b) for a, b in zip(plain, more))
    pooled = net.features(x).mean(dim=(2, 3))  # (5, 16): the last stage's pooled features
    probs = more[-1]
    assert torch.allclose(probs, net.classifier(pooled).softmax(1)) and torch.allclose(probs.sum(1), torch.ones(5))
