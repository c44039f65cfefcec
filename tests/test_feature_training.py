"""loss.feature_training: how the public feature net learns from the public images (issue 12's loss lever)."""

from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from prismfl.config import ConfigError, load_config
from prismfl.data import federation
from prismfl.loss import feature_nets
from prismfl.loss.features import SmallCNN
from prismfl.supervised import augment, train_classifier

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


def test_augment_mirrors_image_by_image_and_shifts_the_batch_with_replicated_edges():
    images = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 1, 3, 3)
    gen = torch.Generator().manual_seed(0)  # this seed mirrors one image of two and shifts both ways
    flips = torch.rand(2, generator=gen) < 0.5
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    assert flips.tolist() == [True, False] and (dx, dy) == (2, 0)
    out = augment(images, torch.Generator().manual_seed(0), shift=1, mirror=True)
    for i in range(2):
        img = images[i, 0].flip(1) if flips[i] else images[i, 0]
        rows = [min(max(r + dy - 1, 0), 2) for r in range(3)]  # the shifted window, edges replicated
        cols = [min(max(c + dx - 1, 0), 2) for c in range(3)]
        assert torch.equal(out[i, 0], img[rows][:, cols])
    assert torch.equal(augment(images, gen, shift=0, mirror=False), images)


def test_augment_draws_from_its_generator_only():
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = augment(images, torch.Generator().manual_seed(5), 2, True)
    b = augment(images, torch.Generator().manual_seed(5), 2, True)
    assert torch.equal(a, b) and not torch.equal(a, images)


def test_the_recipes():
    assert feature_nets.feature_training(load_config(SMOKE, [])) == {"epochs": 10}  # the plain recipe as it always was
    one_cycle = {"lr": 3e-3, "weight_decay": 0.05, "one_cycle": True}
    fashion = feature_nets.feature_training(load_config(SMOKE, ['loss.feature_training="augmented"']))
    assert fashion == {"epochs": 30, **one_cycle, "shift": 2, "mirror": True}
    digits = load_config(SMOKE, ['loss.feature_training="augmented"', 'data.dataset="mnist"'])
    assert feature_nets.feature_training(digits)["mirror"] is False  # a mirrored 2 is not a 2
    shorter = load_config(SMOKE, ['loss.feature_training="augmented"', "loss.feature_epochs=12"])
    assert feature_nets.feature_training(shorter) == {**fashion, "epochs": 12}
    assert feature_nets.feature_training(load_config(SMOKE, ["loss.feature_epochs=3"])) == {"epochs": 3}


def test_a_bad_recipe_is_refused():
    with pytest.raises(ConfigError, match="loss.feature_training"):
        load_config(SMOKE, ['loss.feature_training="fancy"'])
    with pytest.raises(ConfigError, match=r"loss.feature_epochs must be an integer in \[0, 1000\], got -1"):
        load_config(SMOKE, ["loss.feature_epochs=-1"])
    with pytest.raises(ConfigError, match="loss.feature_epochs must be an integer in .*, got 5000"):
        load_config(SMOKE, ["loss.feature_epochs=5000"])


def test_augmented_training_is_seeded_and_differs_from_plain():
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(64, 1, 28, 28, generator=gen) * 2 - 1, torch.randint(0, 10, (64,), generator=gen)

    def trained(**kw):
        torch.manual_seed(0)
        net = train_classifier(SmallCNN(1, 4), images, labels, epochs=2, seed=1, batch_size=32, **kw)
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    a, b = trained(shift=2, mirror=True), trained(shift=2, mirror=True)
    assert torch.equal(a, b) and not torch.equal(a, trained())


@needs_fmnist
def test_the_public_net_is_the_same_whatever_ran_before(tmp_path, monkeypatch):
    """Its initial weights come from the run's seed, not from the process's global generator (which this
    torch seeds at random per process), so a fresh cache trains the same net for the same seed; and the
    global generator is left as it was."""
    monkeypatch.setenv("PRISMFL_CACHE", str(tmp_path))
    cfg = load_config(SMOKE, ['loss.features="public"', "partition.public_holdout=200"])
    fed = federation.prepare_federation(cfg)

    def weights(run_cfg, global_seed):
        torch.manual_seed(global_seed)
        net = feature_nets.train_public_net(run_cfg, *feature_nets.public_feature_data(run_cfg, fed)[:2])
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(global_seed)))
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    a = weights(cfg, 1)
    assert torch.equal(a, weights(cfg, 2))
    assert not torch.equal(a, weights(load_config(SMOKE, ['loss.features="public"', "partition.public_holdout=200",
                                                          "seed=1"]), 1))  # fmt: skip
    _, _, recipe = feature_nets.build_feature_net(cfg, fed, log=lambda *_: None)
    assert recipe["cache_spec"]["version"] == feature_nets.PUBLIC_NET_VERSION == 2
