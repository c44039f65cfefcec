"""train.lr_schedule: the clients' learning rate across rounds (issue 12's schedule lever)."""

import math
from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from prismfl import rundir
from prismfl.config import ConfigError, load_config
from prismfl.fl import client as fl_client
from prismfl.fl import simulate
from prismfl.fl.client import ClientState, LocalConfig, client_loss, local_train, round_lr
from prismfl.loss.features import random_cnn
from prismfl.loss.matching import feature_stats
from prismfl.model import masked
from prismfl.model.build import build_model

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


def test_round_lr_hand_computed():
    # cosine over 3 rounds to 0.1 x lr: round 2 is half way, 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.55
    assert [round_lr(0.2, r, 3, "cosine", 0.1) for r in (1, 2, 3)] == pytest.approx([0.2, 0.11, 0.02])
    # over 5 rounds, round 2: 0.1 + 0.9 * (1 + cos(pi / 4)) / 2
    assert round_lr(1.0, 2, 5, "cosine", 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))
    assert round_lr(0.2, 7, 3, "cosine", 0.1) == pytest.approx(0.02)  # past the last round: the floor
    assert round_lr(0.2, 2, 3, "cosine", 1.0) == 0.2
    assert round_lr(0.2, 3, 3, "constant", 0.1) == 0.2
    assert round_lr(0.2, 1, 1, "cosine", 0.1) == 0.2  # one round: nothing to decay


@pytest.mark.parametrize(("override", "message"), [
    ('train.lr_schedule="linear"', "train.lr_schedule"),
    ("train.lr_floor=0", r"\(0, 1\]"),
    ("train.lr_floor=1.5", r"\(0, 1\]"),
])  # fmt: skip
def test_bad_schedules_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, [override])


def test_a_saved_optimizer_state_does_not_bring_back_its_old_learning_rate():
    """Adam's state_dict carries the lr it ran with; the client's next round must run at its own."""
    cfg = load_config(SMOKE, [])
    model, net = build_model(cfg), random_cnn(1, 4, seed=0)
    real = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss, state = client_loss(cfg, feature_stats(net.extract, real)), ClientState()
    start = torch.zeros(masked.num_maskable(model))
    for lr in (0.1, 0.01):
        local_train(model, start, loss, net.extract, state=state, cfg=LocalConfig(2, 8, lr),
                    generator=torch.Generator().manual_seed(1))  # fmt: skip
        assert state.optimizer["param_groups"][0]["lr"] == lr


@needs_fmnist
def test_the_clients_train_each_round_at_the_scheduled_rate(tmp_path, monkeypatch):
    seen = []

    def recording(*args, cfg, **kwargs):
        seen.append(cfg.lr)
        return local_train(*args, cfg=cfg, **kwargs)

    monkeypatch.setattr(fl_client, "local_train", recording)
    quiet = {"log": lambda *_: None}
    base = ["train.sample_every=0", "train.lr=0.2"]
    cosine = simulate.train(load_config(SMOKE, [*base, 'train.lr_schedule="cosine"']), tmp_path / "cos", **quiet)
    per_round = len(seen) // 3
    assert seen == pytest.approx([0.2] * per_round + [0.11] * per_round + [0.02] * per_round)
    seen.clear()
    flat = simulate.train(load_config(SMOKE, [*base, 'train.lr_schedule="cosine"', "train.lr_floor=1"]),
                          tmp_path / "flat", **quiet)  # fmt: skip
    const = simulate.train(load_config(SMOKE, base), tmp_path / "const", **quiet)
    assert set(seen) == {0.2}
    scores = {name: rundir.load_checkpoint(run)["server"]["scores"] for name, run in
              (("cosine", cosine), ("flat", flat), ("const", const))}  # fmt: skip
    assert torch.equal(scores["flat"], scores["const"])  # a floor of 1 is the constant schedule, bit for bit
    assert not torch.equal(scores["cosine"], scores["const"])
