"""The quantized broadcast (fl/quantize.py, train.broadcast = "quantized"): levels, unbiasedness, the coder's
round trip and refusals, and PRISM's rounds with it (one message a round, no replica, resume bit-exact)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_fmnist
from prismfl import rundir
from prismfl.config import load_config
from prismfl.errors import ConfigError
from prismfl.fl import quantize, simulate, wire
from prismfl.fl.methods.base import scores_crc
from prismfl.fl.methods.registry import build
from test_run import assert_same_run, kill_during

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
TABLE = wire.layer_table_hash([("w", (7,))])
QUANTIZED = ['train.broadcast="quantized"', "train.server_momentum=0.8"]


def test_levels_are_evenly_spaced_logits_over_the_smoothing_bound():
    bound = math.log(0.99 / 0.01)  # 4.59512
    assert quantize.level_scores(4, 0.01).tolist() == pytest.approx([-bound, -bound / 3, bound / 3, bound], abs=1e-6)
    assert quantize.level_scores(2, 0.01).dtype == torch.float32
    for bad in (1, 257, 4.0, True):
        with pytest.raises(ValueError):
            quantize.level_scores(bad, 0.01)


def test_a_probability_on_a_level_stays_there_and_one_beyond_the_outer_levels_takes_them():
    levels = quantize.level_scores(4, 0.01)
    scores = torch.cat([levels, torch.tensor([-9.0, 9.0, 50.0])])
    idx = quantize.quantize(scores, 4, 0.01, torch.Generator().manual_seed(0))
    assert idx.dtype == torch.uint8 and idx.tolist() == [0, 1, 2, 3, 0, 3, 3]
    assert torch.equal(quantize.dequantize(idx, 4, 0.01)[:4], levels)


def test_between_two_levels_the_upper_one_comes_with_the_probability_that_keeps_the_mean():
    # p = 0.5 lies between levels sigmoid(-1.53171) = 0.17774 and sigmoid(1.53171) = 0.82226: up with (0.5 -
    # 0.17774) / (0.82226 - 0.17774) = 0.5; p = 0.3 -> (0.3 - 0.17774) / 0.64452 = 0.18969
    n = 200_000
    for p, up in ((0.5, 0.5), (0.3, 0.18969)):
        scores = torch.full((n,), math.log(p / (1 - p)))
        idx = quantize.quantize(scores, 4, 0.01, torch.Generator().manual_seed(1))
        assert set(idx.unique().tolist()) == {1, 2}
        share = float((idx == 2).double().mean())
        assert abs(share - up) < 4 * math.sqrt(up * (1 - up) / n)  # 4 standard errors


def test_the_quantized_probabilities_are_unbiased_on_a_spread_of_scores():
    n = 400_000
    scores = torch.randn(n, generator=torch.Generator().manual_seed(2)) * 3
    scores = scores.clamp(-4.59, 4.59)
    for levels in (2, 4, 16):
        idx = quantize.quantize(scores, levels, 0.01, torch.Generator().manual_seed(3))
        q = torch.sigmoid(quantize.dequantize(idx, levels, 0.01).double())
        err = q - torch.sigmoid(scores.double())
        # the mean error of n independent roundings, each within one level gap (<= 0.5 at 2 levels)
        assert abs(float(err.mean())) < 4 * float(err.std()) / math.sqrt(n)
        assert levels == 2 or float(err.abs().max()) < 0.66


def test_the_draw_is_seeded_by_run_and_round():
    scores = torch.randn(5000, generator=torch.Generator().manual_seed(4))
    a, b = (quantize.round_indices(scores, 4, 0.01, seed=7, round_=3) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, quantize.round_indices(scores, 4, 0.01, seed=7, round_=4))
    assert not torch.equal(a, quantize.round_indices(scores, 4, 0.01, seed=8, round_=3))


def message(indices, levels: int = 4, rnd: int = 2) -> bytes:
    return quantize.encode(torch.tensor(indices, dtype=torch.uint8), levels, round_=rnd, table_hash=TABLE)


def test_the_message_layout_and_round_trip():
    data = message([0, 3, 3, 1, 3, 0, 3])
    msg = wire.parse(data, table_hash=TABLE, num_weights=7)
    assert (msg.kind, msg.coder, msg.round, msg.client) == (wire.KIND_STATE, wire.CODER_QUANTIZED, 2, wire.SERVER)
    assert msg.payload[:4] == (4).to_bytes(4, "little")
    assert np.frombuffer(msg.payload[4:20], "<u4").tolist() == [2, 1, 0, 4]  # the indices' histogram
    assert len(msg.payload) % 4 == 0 and len(msg.payload) > 20
    got = quantize.decode(data, num_weights=7, table_hash=TABLE, count=4, round_=2)
    assert got.tolist() == [0, 3, 3, 1, 3, 0, 3]
    big = torch.randint(0, 4, (100_000,), generator=torch.Generator().manual_seed(5)).to(torch.uint8)
    coded = quantize.encode(big, 4, round_=1, table_hash=TABLE)
    assert len(coded) < wire.HEADER.size + 20 + 100_000 * 2 / 8 * 1.01  # about 2 bits a uniform index
    assert torch.equal(quantize.decode(coded, num_weights=100_000, table_hash=TABLE, count=4, round_=1), big)
    with pytest.raises(ValueError):
        message([0, 4, 1, 1, 1, 1, 1])  # an index beyond the levels


def resealed(data: bytes, payload: bytes) -> bytes:
    msg = wire.parse(data, table_hash=TABLE, num_weights=7)
    return wire.Message(msg.kind, msg.coder, msg.round, msg.client, msg.table_hash, 7, payload).to_bytes()


def test_a_client_refuses_every_other_quantized_message():
    good = message([0, 3, 3, 1, 3, 0, 3])
    payload = wire.parse(good, table_hash=TABLE, num_weights=7).payload
    hist = bytearray(payload)
    hist[4:8] = (3).to_bytes(4, "little")  # counts 8 values
    swapped = bytearray(payload)
    swapped[4:8], swapped[16:20] = payload[16:20], payload[4:8]  # a histogram that is not the indices' own
    bad = {
        "other levels": message([0, 1, 1, 1, 1, 0, 1], levels=2),
        "other round": message([0, 3, 3, 1, 3, 0, 3], rnd=3),
        "bad count": resealed(good, bytes(hist)),
        "not its histogram": resealed(good, bytes(swapped)),
        "stray word": resealed(good, payload + bytes(4)),
        "short": resealed(good, payload[:12]),
        "odd length": resealed(good, payload + bytes(1)),
        "a delta": wire.encode_delta(torch.zeros(7, dtype=torch.int32), 2, None, 0.01, torch.zeros(7), round_=2,
                                     table_hash=TABLE),
        "a float state": wire.encode_state(torch.zeros(7), round_=2, table_hash=TABLE),
    }  # fmt: skip
    for what, data in bad.items():
        with pytest.raises(wire.WireError):
            quantize.decode(data, num_weights=7, table_hash=TABLE, count=4, round_=2)
            pytest.fail(what)


def test_the_config_names_the_broadcast_and_its_levels():
    cfg = load_config(SMOKE, QUANTIZED)
    assert cfg.train.broadcast == "quantized" and cfg.train.broadcast_levels == 4
    with pytest.raises(ConfigError, match="broadcast_levels"):
        load_config(SMOKE, [*QUANTIZED, "train.broadcast_levels=1"])
    with pytest.raises(ConfigError, match="train.broadcast"):
        load_config(SMOKE, ['train.broadcast="int8"'])
    # without deltas, a round is not bounded by what one delta holds
    load_config(SMOKE, [*QUANTIZED, "partition.num_clients=300", "train.client_fraction=1.0",
                        "data.subset=30000"])  # fmt: skip


def test_prism_sends_every_client_of_a_round_the_same_one_message_and_decodes_against_it():
    m = build(load_config(SMOKE, [*QUANTIZED, "train.client_fraction=1.0"]))
    n = 5000
    scores = torch.randn(n, generator=torch.Generator().manual_seed(6)) * 2
    state = {"num_weights": n, "table_hash": TABLE, "scores": scores.clone(), "synced": [None] * 3,
             "delta_sizes": {}, "deltas": {}, "velocity": torch.zeros(n)}  # fmt: skip
    plan = m.plan(state, 1)
    (msg,) = plan.downlinks[0].messages
    assert all(d.messages == [msg] for d in plan.downlinks.values())
    assert plan.download_bytes == 3 * len(msg) and len(msg) < wire.HEADER.size + 20 + n * 2 / 8 + 8
    sent = quantize.dequantize(quantize.round_indices(scores, 4, 0.01, 0, 1), 4, 0.01)
    assert plan.downlinks[1].check == scores_crc(sent)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(7)) < torch.sigmoid(sent)
    data = wire.encode_upload(mask, sent, round_=1, table_hash=TABLE, client=1, coder="range")
    assert torch.equal(m.decode(state, 1, 1, data), mask)
    with pytest.raises(wire.WireError):  # coded against the full-precision scores: not what was sent
        m.decode(state, 1, 1, wire.encode_upload(mask, scores, round_=1, table_hash=TABLE, client=1, coder="range"))
    out = m.aggregate(state, 1, {k: (data, mask) for k in range(3)}, [1, 1, 1])
    assert out.broadcast_bytes == len(msg) and state["delta_sizes"] == {} and state["deltas"] == {}


@needs_fmnist
def test_a_quantized_run_keeps_no_replica_and_resumes_bit_exact(tmp_path, monkeypatch):
    cfg = load_config(SMOKE, QUANTIZED)
    whole = simulate.train(cfg, tmp_path / "whole", log=lambda *_: None)
    state = rundir.load_checkpoint(tmp_path / "whole")
    assert state["clients"]["replicas"] == {} and all(c["replica"] is None for c in state["clients"]["clients"])
    n = state["server"]["num_weights"]
    records = rundir.read_metrics(tmp_path / "whole")
    for r in records:  # every client of a round got the same message, at most about 2 bits a weight
        assert r["download_bytes"] == len(r["clients"]) * r["broadcast_bytes"]
        assert r["broadcast_bytes"] < wire.HEADER.size + 20 + 2 * n / 8 * 1.01
    restore = kill_during(monkeypatch, 2 * 3 + 2)  # killed during round 3, after its first client
    with pytest.raises(KeyboardInterrupt):
        simulate.train(cfg, tmp_path / "killed", log=lambda *_: None)
    restore()
    simulate.train(cfg, tmp_path / "killed", resume=True, log=lambda *_: None)
    assert_same_run(whole, tmp_path / "killed")
