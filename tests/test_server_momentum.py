"""train.server_momentum: heavy-ball momentum of the server's update of the global scores (issue 12).
The clients replicate the velocity from the broadcast deltas; a full state carries it in a second message."""

import math
from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from prismfl import rundir
from prismfl.capabilities import MASK_MODEL
from prismfl.config import ConfigError, load_config
from prismfl.errors import PrismError
from prismfl.fl import aggregate, simulate, wire
from prismfl.fl.methods import prism

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
MOMENTUM = ["train.server_momentum=0.5", "train.sample_every=0"]


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
    (["train.server_momentum=1.0"], "[0, 1)"),
    (["train.server_momentum=-0.1"], "[0, 1)"),
])  # fmt: skip
def test_bad_momentum_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(SMOKE, overrides)


def test_the_baselines_ignore_the_server_momentum_of_a_shared_config():
    demo = Path(__file__).resolve().parents[1] / "configs" / "fmnist-noniid.toml"
    assert load_config(demo).train.server_momentum > 0  # the demo uses it
    for method in ("fedavg", "central", "local"):
        unconditional = ["model.modes=1", "loss.codes_per_step=0", "model.conditional=false"]
        assert load_config(demo, [f'train.method="{method}"', *unconditional]).train.method == method


@needs_fmnist
def test_a_momentum_run_keeps_its_velocity_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    from test_run import assert_same_run, kill_during

    quiet = {"log": lambda *_: None}
    plain = simulate.train(load_config(SMOKE, ["train.sample_every=0"]), tmp_path / "plain", **quiet)
    cfg = load_config(SMOKE, MOMENTUM)
    whole = simulate.train(cfg, tmp_path / "whole", **quiet)
    a, b = rundir.load_checkpoint(plain)["server"], rundir.load_checkpoint(whole)["server"]
    assert "velocity" not in a and b["velocity"].shape == b["scores"].shape
    assert float(b["velocity"].abs().max()) > 0
    assert not torch.equal(a["scores"], b["scores"])  # the momentum changed the trajectory
    # the first round's velocity is its pseudo-gradient alone, so round 1 is the blend (up to rounding)
    lam = [r["lambda"] for r in rundir.read_metrics(whole)]
    assert lam == pytest.approx([r["lambda"] for r in rundir.read_metrics(plain)][:1] + lam[1:])

    # the clients rebuild scores and velocity from the deltas: the same run as with full float32 states
    full = simulate.train(load_config(SMOKE, [*MOMENTUM, 'train.broadcast="float32"']), tmp_path / "full", **quiet)
    assert (full / MASK_MODEL).read_bytes() == (whole / MASK_MODEL).read_bytes()
    assert torch.equal(rundir.load_checkpoint(full)["server"]["velocity"], b["velocity"])
    downs = [r["download_bytes"] for r in rundir.read_metrics(whole)]
    assert 0 < downs[1] < [r["download_bytes"] for r in rundir.read_metrics(full)][1] / 4

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


def server_rounds(beta: float, rounds: int = 5, n: int = 300):
    """A PRISM server with momentum fed random masks from 3 clients: (method, state, the deltas' bytes)."""
    from test_methods import method

    m = method("prism", f"train.server_momentum={beta}")
    table = wire.layer_table_hash([("w", (n,))])
    start = torch.randn(n, generator=torch.Generator().manual_seed(0))
    state = {"num_weights": n, "table_hash": table, "scores": start, "velocity": torch.zeros(n),
             "synced": [0] * 3, "delta_sizes": {}, "deltas": {}}  # fmt: skip
    deltas = []
    for rnd in range(1, rounds + 1):
        scores, ups = state["scores"], {}
        for k in range(3):
            mask = aggregate.sample_mask(scores + k, torch.Generator().manual_seed(10 * rnd + k))
            data = wire.encode_upload(mask, scores, round_=rnd, table_hash=table, client=k, coder="auto")
            ups[k] = (data, m.decode(state, rnd, k, data))
        m.aggregate(state, rnd, ups, [1, 1, 1])
        deltas.append(state["deltas"][rnd].numpy().tobytes())
    return m, state, table, start, deltas


def test_clients_rebuild_scores_and_velocity_from_the_deltas_bit_for_bit():
    n = 300
    m, state, table, start, deltas = server_rounds(0.8, n=n)
    held, replica = 0, torch.cat([start, torch.zeros(n)])
    for rnd, delta in enumerate(deltas, 1):
        held, replica = prism.catch_up(replica, held, [delta], num_weights=n, table_hash=table, beta=0.8)
        assert held == rnd
    assert held == 5 and torch.equal(replica, torch.cat([state["scores"], state["velocity"]]))
    assert float(state["velocity"].abs().max()) > 0
    # a client that ignores the velocity (beta 0) drifts off: round 2's delta, coded against the
    # server's scores, no longer decodes against its replica
    with pytest.raises(wire.WireError):
        prism.catch_up(start, 0, deltas, num_weights=n, table_hash=table)


def test_a_late_client_gets_scores_and_velocity_as_two_full_state_messages():
    n = 300
    m, state, table, start, deltas = server_rounds(0.8, n=n)
    state["synced"] = [None, 0, 5]  # client 0 is unknown, client 1 holds round 0, client 2 is up to date
    plan = m.plan(state, 6)
    full = plan.downlinks[0].messages
    assert len(full) == 2 and all(wire.parse(d, table_hash=table, num_weights=n).kind == wire.KIND_STATE for d in full)
    held, replica = prism.catch_up(torch.zeros(2 * n), 3, full, num_weights=n, table_hash=table, beta=0.8)
    assert held == 5 and torch.equal(replica, torch.cat([state["scores"], state["velocity"]]))
    assert plan.downlinks[0].check == prism.scores_crc(replica)
    assert plan.downlinks[2].messages == []
    held, again = prism.catch_up(torch.cat([start, torch.zeros(n)]), 0, plan.downlinks[1].messages,
                                 num_weights=n, table_hash=table, beta=0.8)  # fmt: skip
    assert held == 5 and torch.equal(again, replica)
    # a replica without its velocity is refused with a clear line
    with pytest.raises(PrismError, match="scores and velocity"):
        prism.catch_up(start, 0, plan.downlinks[1].messages, num_weights=n, table_hash=table, beta=0.8)
    # a full state without its velocity, or with a velocity of another round, is refused
    with pytest.raises(wire.UnexpectedMessage, match="velocity"):
        prism.catch_up(torch.zeros(2 * n), 3, full[:1], num_weights=n, table_hash=table, beta=0.8)
    other = wire.encode_state(state["velocity"], round_=4, table_hash=table)
    with pytest.raises(wire.UnexpectedMessage, match="velocity is of round 4"):
        prism.catch_up(torch.zeros(2 * n), 3, [full[0], other], num_weights=n, table_hash=table, beta=0.8)
