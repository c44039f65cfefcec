"""train.warm_start: prism's round-0 global scores trained on the public hold-out, then federated.

Checked here: the refusals, and that the baselines ignore it; that the scores the engine starts from
are exactly what fl.client.warm_start computes (deterministic in the seed), that they lower the
public matching loss, that every client gets them as a full state in round 1, that the model records
the warm start (also after a resume), and that scores which do not decode stop the run with one line.
"""

from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from prismfl import rundir
from prismfl.config import ConfigError, load_config
from prismfl.errors import PrismError
from prismfl.fl import client as fl_client
from prismfl.fl import engine, simulate, wire
from prismfl.fl.client import ClientState, client_context, client_loss, exact_stats, local_train, warm_start
from prismfl.fl.methods.registry import build
from prismfl.model.build import initial_scores

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
WARM = ['loss.features="public"', "train.warm_start=30", "train.rounds=2", "train.sample_every=0"]
QUIET = {"log": lambda *_: None}


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["train.warm_start=-1"], "train.warm_start must be an integer in"),
        (["train.warm_start=20000000"], "got 20000000"),
        # without public images the warm start trains on the clients' pooled statistics, which secagg hides
        (
            ["train.warm_start=10", "privacy.epsilon=1", "privacy.pool=1", "privacy.secagg=true"],
            "privacy.secagg hides",
        ),
        (['loss.features="public"', "train.warm_start=10", "partition.public_holdout=0"], "public_holdout > 0"),
    ],
)
def test_bad_warm_starts_are_refused_with_one_line(overrides, says):
    with pytest.raises(ConfigError, match=says):
        load_config(SMOKE, overrides)


@needs_fmnist
def test_the_baselines_ignore_it_as_they_ignore_the_server_momentum(tmp_path, monkeypatch):
    """A config serves --method central as it is: no warm start is trained, none is recorded."""
    cfg = load_config(
        SMOKE, ["train.warm_start=10", 'train.method="central"', "train.rounds=1", "train.sample_every=0"]
    )
    monkeypatch.setattr(simulate, "warm_start", lambda *a: pytest.fail("a baseline trained a warm start"))
    out = simulate.train(cfg, tmp_path / "central", **QUIET)
    assert "warm_start" not in rundir.load_checkpoint(out)["model_info"]


def public_loss(ctx, scores: torch.Tensor) -> float:
    """The run's matching loss against the public images' statistics, at `scores`, over 20 fixed batches."""
    loss = client_loss(ctx.cfg, exact_stats(ctx, ctx.fed.images(ctx.fed.public_idx), None, 0))
    result = local_train(ctx.model, scores, loss, ctx.extract, state=ClientState(),
                         cfg=ctx.local_config(20, lr=1e-12), generator=torch.Generator().manual_seed(7))  # fmt: skip
    return result.loss


@needs_fmnist
def test_the_run_starts_from_the_warm_start_and_sends_it_as_a_full_state(tmp_path, monkeypatch):
    cfg = load_config(SMOKE, WARM)
    method = build(cfg)
    ctx = client_context(cfg, method.build_model, "cpu", log=lambda *_: None)
    message, info = warm_start(ctx, 30)
    n = ctx.num_weights
    assert message == warm_start(ctx, 30)[0]  # deterministic in the seed
    assert info["steps"] == 30 and info["images"] == 500
    held, scores = wire.decode_state(message, num_weights=n, table_hash=ctx.table_hash)
    start = initial_scores(cfg, n)
    assert held == 0 and not torch.equal(scores, start)
    assert public_loss(ctx, scores) < 0.9 * public_loss(ctx, start)  # 30 steps on the public images pay

    received, original = [], type(method).warm_start

    def recording(self, state, m):
        received.append(m)
        original(self, state, m)

    monkeypatch.setattr(type(method), "warm_start", recording)
    out = simulate.train(cfg, tmp_path / "run", **QUIET)
    assert received == [message]  # what the engine started from is exactly the warm start above
    first, second = rundir.read_metrics(out)
    # full states: the warm start's scores, range-coded (lossless, and smaller than float32)
    coded = wire.encode_state(scores, round_=0, table_hash=ctx.table_hash, coder="auto")
    assert coded[6] == wire.CODER_PLANES and len(coded) < wire.HEADER.size + 4 * n
    assert first["download_bytes"] == len(first["clients"]) * len(coded)
    assert second["download_bytes"] < first["download_bytes"] / 4  # then deltas
    ckpt = rundir.load_checkpoint(out)
    assert ckpt["model_info"]["warm_start"]["steps"] == 30 and ckpt["model_info"]["warm_start"]["images"] == 500

    cold = simulate.train(load_config(SMOKE, [*WARM, "train.warm_start=0"]), tmp_path / "cold", **QUIET)
    assert not torch.equal(rundir.load_checkpoint(cold)["server"]["scores"], ckpt["server"]["scores"])
    assert "warm_start" not in rundir.load_checkpoint(cold)["model_info"]


@needs_fmnist
def test_a_resumed_warm_run_keeps_its_record_and_does_not_train_it_again(tmp_path, monkeypatch):
    cfg, out = load_config(SMOKE, WARM), tmp_path / "run"

    class Stopped(Exception):
        pass

    def stop_after_round_1(rnd, state):
        raise Stopped

    with pytest.raises(Stopped):
        engine.run(cfg, out, simulate.InProcess(cfg), on_round=stop_after_round_1, **QUIET)
    assert rundir.load_checkpoint(out)["round"] == 1
    monkeypatch.setattr(simulate, "warm_start", lambda *a: pytest.fail("a resumed run trained its warm start again"))
    simulate.train(cfg, out, resume=True, **QUIET)
    ckpt = rundir.load_checkpoint(out)
    assert ckpt["round"] == 2 and ckpt["model_info"]["warm_start"]["steps"] == 30


def test_scores_that_do_not_decode_stop_the_run_with_one_line():
    cfg = load_config(SMOKE)
    method = build(cfg)
    n, th = 100, 7
    state = method.init_state(n, th)
    setup = engine.Setup(num_weights=n, table_hash=th, class_table=None, class_names=[], source="", feature_meta={},
                         privacy=None)  # fmt: skip
    for bad, says in ((wire.encode_state(torch.zeros(n), round_=3, table_hash=th), "not of round 0"),
                      (wire.encode_state(torch.zeros(n - 1), round_=0, table_hash=th), "do not decode"),
                      (b"\x00" * 64, "do not decode")):  # fmt: skip
        setup.warm_start = bad
        with pytest.raises(PrismError, match=says):
            engine.warm_start(method, state, setup, lambda *_: None)
    setup.warm_start = None
    with pytest.raises(PrismError, match="no warm-start scores"):
        engine.warm_start(method, state, setup, lambda *_: None)
    setup.warm_start = wire.encode_state(torch.full((n,), 2.0), round_=0, table_hash=th)
    engine.warm_start(method, state, setup, lambda *_: None)
    assert torch.equal(state["scores"], torch.full((n,), 2.0)) and state["synced"] == [None] * 3


@needs_fmnist
def test_the_warm_start_trains_at_train_lr_in_chunks_of_100_steps(monkeypatch):
    """The warm start's steps go in chunks of 100 (250 steps: 100, 100, 50), each at train.lr."""
    seen = []

    def recording(*args, cfg, **kwargs):
        seen.append((cfg.steps, cfg.lr))
        return local_train(*args, cfg=cfg, **kwargs)

    monkeypatch.setattr(fl_client, "local_train", recording)
    base = [*WARM, "train.lr=0.2", "train.batch_size=4"]  # small steps: the rates are what is checked
    cfg = load_config(SMOKE, base)
    ctx = client_context(cfg, build(cfg).build_model, "cpu", log=lambda *_: None)
    warm_start(ctx, 250)
    assert seen == [(100, 0.2), (100, 0.2), (50, 0.2)]
