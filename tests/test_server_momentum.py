"""train.server_momentum: heavy-ball momentum of the server's update of the global scores (issue 12)."""

import math
from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from prismfl import rundir
from prismfl.config import ConfigError, load_config
from prismfl.fl import aggregate, simulate

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
MOMENTUM = ['train.broadcast="float32"', "train.server_momentum=0.5", "train.sample_every=0"]


def test_momentum_step_hand_computed():
    old, proposal, velocity = torch.tensor([0.0, 1.0]), torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    new, v = aggregate.momentum_step(old, proposal, velocity, beta=0.5, step=0.5, smoothing=0.01)
    # v = 0.5 * [1, 0] + ([2, -1] - [0, 1]) = [2.5, -2]; s = [0, 1] + 0.5 * v = [1.25, 0]
    assert torch.equal(v, torch.tensor([2.5, -2.0])) and torch.equal(new, torch.tensor([1.25, 0.0]))


def test_momentum_step_stays_inside_the_smoothing_bounds():
    bound = math.log(0.99 / 0.01)
    old, proposal = torch.tensor([4.5, -4.5]), torch.tensor([bound, -bound])
    new, v = aggregate.momentum_step(old, proposal, torch.tensor([10.0, -10.0]), 0.9, 1.0, 0.01)
    assert torch.allclose(new, torch.tensor([bound, -bound])) and float(v[0]) > 9  # the velocity itself is kept
    new, _ = aggregate.momentum_step(old, proposal, torch.tensor([100.0, -100.0]), 0.9, 1.0, 0.0)
    assert float(new[0]) == pytest.approx(math.log((1 - 1e-6) / 1e-6))


def test_no_momentum_is_the_blend_and_no_mada_steps_all_the_way():
    g = torch.Generator().manual_seed(0)
    old, proposal = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    new, v = aggregate.momentum_step(old, proposal, torch.zeros(1000), 0.0, 0.3, 0.01)
    assert torch.allclose(new, aggregate.blend(old, proposal, 0.3).clamp(-4.6, 4.6), atol=1e-6)
    assert torch.equal(v, proposal - old)
    new, _ = aggregate.momentum_step(old, proposal, torch.zeros(1000), 0.0, 1.0, 0.01)
    assert torch.allclose(new, proposal.clamp(-math.log(99), math.log(99)), atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["train.server_momentum=0.5"], "train.broadcast = 'float32'"),
    (['train.broadcast="float32"', "train.server_momentum=1.0"], "[0, 1)"),
    (['train.broadcast="float32"', "train.server_momentum=-0.1"], "[0, 1)"),
    (['train.broadcast="float32"', "train.server_momentum=0.5", 'train.method="fedavg"'], "train.method = 'prism'"),
])  # fmt: skip
def test_bad_momentum_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(SMOKE, overrides)


@needs_fmnist
def test_a_momentum_run_keeps_its_velocity_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    from test_run import assert_same_run, kill_during

    quiet = {"log": lambda *_: None}
    plain = simulate.train(load_config(SMOKE, ['train.broadcast="float32"', "train.sample_every=0"]),
                           tmp_path / "plain", **quiet)  # fmt: skip
    cfg = load_config(SMOKE, MOMENTUM)
    whole = simulate.train(cfg, tmp_path / "whole", **quiet)
    a, b = rundir.load_checkpoint(plain)["server"], rundir.load_checkpoint(whole)["server"]
    assert "velocity" not in a and b["velocity"].shape == b["scores"].shape
    assert float(b["velocity"].abs().max()) > 0
    assert not torch.equal(a["scores"], b["scores"])  # the momentum changed the trajectory
    # the first round's velocity is its pseudo-gradient alone, so round 1 is the blend (up to rounding)
    lam = [r["lambda"] for r in rundir.read_metrics(whole)]
    assert lam == pytest.approx([r["lambda"] for r in rundir.read_metrics(plain)][:1] + lam[1:])

    restore = kill_during(monkeypatch, 2 * 3 + 2)  # killed during round 3
    with pytest.raises(KeyboardInterrupt):
        simulate.train(cfg, tmp_path / "killed", **quiet)
    restore()
    simulate.train(cfg, tmp_path / "killed", resume=True, **quiet)
    assert_same_run(whole, tmp_path / "killed")


@needs_fmnist
def test_a_checkpoint_without_a_usable_velocity_is_refused(tmp_path):
    from prismfl.fl.methods import registry
    from prismfl.safestate import StateError

    cfg = load_config(SMOKE, [*MOMENTUM, "train.rounds=1"])
    state = rundir.load_checkpoint(simulate.train(cfg, tmp_path / "run", log=lambda *_: None))["server"]
    method, n = registry.build(cfg), state["num_weights"]
    method.check_state(state, n)
    for bad in (None, torch.zeros(n - 1), torch.zeros(n, dtype=torch.float64), torch.full((n,), float("nan"))):
        broken = {**state, "velocity": bad} if bad is not None else {k: v for k, v in state.items() if k != "velocity"}
        with pytest.raises(StateError, match="server velocity"):
            method.check_state(broken, n)
