"""The demo's public feature net ships with prismfl: found by the exact public data and recipe it was
trained with, wherever the data lies; never trained or cached again; damaged or unknown, a clear error."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_fmnist
from prismfl.config import load_config
from prismfl.data import federation
from prismfl.errors import PrismError
from prismfl.loss import feature_nets
from prismfl.shipped import WEIGHTS, Shipped, WeightsError

DEMO = "configs/fmnist-public.toml"  # the privileged setting: its public net ships
((KEY, NET),) = feature_nets.SHIPPED_PUBLIC_NETS.items()


def _no_training(message):
    raise AssertionError(f"trained instead of loading the shipped net: {message}")


def test_the_shipped_public_net_is_the_pinned_file():
    assert hashlib.sha256((WEIGHTS / NET.file).read_bytes()).hexdigest() == NET.sha256


def test_the_key_names_the_data_and_recipe_not_where_the_data_was_read_from():
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(8, 1, 28, 28, generator=gen), np.arange(8) % 10
    spec = {"kind": "public-cnn", "width": 32, "seed": 0, "source": "IDX files in /usr/share/datasets/fashion-mnist"}
    key = feature_nets.shipped_key(spec, images, labels)
    assert key == feature_nets.shipped_key({**spec, "source": "IDX files in /home/me/data"}, images, labels)
    other = images.clone()
    other[0, 0, 0, 0] += 1e-6  # one pixel, one float step away
    assert key != feature_nets.shipped_key(spec, other, labels)
    assert key != feature_nets.shipped_key(spec, images, labels[::-1].copy())
    assert key != feature_nets.shipped_key({**spec, "seed": 1}, images, labels)
    assert key != feature_nets.shipped_key({**spec, "width": 64}, images, labels)


@needs_fmnist
def test_the_demo_loads_the_shipped_net_without_training_or_caching_it(tmp_path, monkeypatch):
    from prismfl.data.sources import load_split, to_float
    from prismfl.supervised import predict

    monkeypatch.setenv("PRISMFL_CACHE", str(tmp_path))
    cfg = load_config(DEMO, [])
    fed = federation.prepare_federation(cfg)
    net, meta, recipe = feature_nets.build_feature_net(cfg, fed, log=_no_training)
    assert recipe["shipped"] == KEY and meta["sha256"] == NET.sha256 and NET.file in meta["weights"]
    assert not list(tmp_path.iterdir())  # nothing trained, nothing cached
    again = feature_nets.feature_net_from_recipe(cfg, recipe)  # what a Flower ClientApp process rebuilds
    x = fed.images(fed.public_idx[:16])
    assert all(torch.equal(a, b) for a, b in zip(net.extract(x), again.extract(x)))
    # it is a trained classifier: the FashionMNIST test set, though it learnt from 5,000 public images
    from prismfl.loss.features import SmallCNN
    from prismfl.shipped import load_shipped

    clf = load_shipped(NET, SmallCNN(1, cfg.loss.feature_width, 10), "net").eval()
    test = load_split("fashion-mnist", "test")
    accuracy = float(
        (predict(clf, to_float(test.images, 28)).argmax(1) == torch.from_numpy(test.labels)).float().mean()
    )
    assert abs(accuracy - 0.8522) <= 5e-4


@needs_fmnist
def test_a_damaged_shipped_net_or_an_unknown_one_is_a_clear_error(monkeypatch):
    cfg = load_config(DEMO, [])
    fed = federation.prepare_federation(cfg)
    _, _, recipe = feature_nets.build_feature_net(cfg, fed, log=_no_training)
    monkeypatch.setitem(feature_nets.SHIPPED_PUBLIC_NETS, KEY, Shipped(NET.file, "0" * 64))
    with pytest.raises(WeightsError, match="the public feature net .* fails its sha256 check"):
        feature_nets.build_feature_net(cfg, fed, log=_no_training)
    with pytest.raises(PrismError, match="'feedfacefeedface' does not ship with this prismfl"):
        feature_nets.feature_net_from_recipe(cfg, {**recipe, "shipped": "feedfacefeedface"})


@needs_fmnist
def test_a_run_does_not_resume_with_another_feature_net_than_it_started_with(tmp_path, monkeypatch):
    """The clients' statistics in the checkpoint are of the net the run started with: a net retrained
    since (a deleted cache entry) or shipped since would train them against other features."""
    from prismfl import rundir
    from prismfl.fl import engine, simulate

    monkeypatch.setenv("PRISMFL_CACHE", str(tmp_path / "cache"))
    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
    cfg = load_config(smoke, ['loss.features="public"', "train.rounds=2", "train.sample_every=0"])
    out = tmp_path / "run"

    def stop(rnd, state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.run(cfg, out, simulate.InProcess(cfg), on_round=stop, log=lambda *_: None)
    started = rundir.load_checkpoint(out)["model_info"]["feature_net"]["sha256"]
    real = feature_nets.build_feature_net

    def retrained(*args, **kwargs):
        net, meta, recipe = real(*args, **kwargs)
        return net, {**meta, "sha256": "f" * 64}, recipe

    monkeypatch.setattr(feature_nets, "build_feature_net", retrained)
    with pytest.raises(PrismError, match=f"started with another feature net \\(sha256 {started[:12]}, now ffffff"):
        simulate.train(cfg, out, resume=True, log=lambda *_: None)
    assert rundir.load_checkpoint(out)["round"] == 1
    monkeypatch.setattr(feature_nets, "build_feature_net", real)
    simulate.train(cfg, out, resume=True, log=lambda *_: None)  # the same net: it resumes
    assert rundir.load_checkpoint(out)["round"] == 2
