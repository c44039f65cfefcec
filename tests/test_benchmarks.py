"""The benchmark scripts stay runnable: their measuring functions on tiny sizes."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_and_aggregation_timers_run():
    steps = load("steps")
    r = steps.time_steps(["model.arch=mlp", "model.width=16", "model.z_dim=8"], steps=2, batch=4)
    assert r["maskable_weights"] == 8 * 16 + 16 * 32 + 32 * 784
    assert r["ms_per_step"] > 0
    assert steps.time_aggregation(1000, clients=3, repeats=1) > 0


@pytest.mark.parametrize("shift", [0.0, 2.0])
def test_codec_measurement_round_trips(shift):
    import torch

    codec = load("codec")
    r = codec.measure(torch.randn(20_000, generator=torch.Generator().manual_seed(0)) * 3, shift, m=2)
    assert r["upload_bits_per_weight"] < 1.0
    assert r["ratio_to_bound"] < 1.02


def test_codec_state_measurement_counts_the_messages_bytes():
    import torch

    codec = load("codec")
    zeros = codec.measure_state(torch.zeros(20_000))
    assert zeros["float32_bytes"] == 36 + 80_000 and zeros["coder"] == "range-planes"
    assert zeros["coded_bytes"] < 36 + 4096 + 64 and zeros["ratio"] == zeros["coded_bytes"] / 80_036


def test_the_fuzz_campaign_runs_and_finds_no_crash_hang_or_wrong_accept():
    fuzz = load("fuzz")
    # (the restored state's target trains a run first; tests/test_resume_fields.py covers it field by field)
    for name in [*fuzz.TARGETS, *(t for t in fuzz.STRUCTURED if t != "restored state")]:
        r = fuzz.campaign(name, 60, seed=1)
        assert 0 < r["tried"] <= 60 and r["clean error"] > 0, name
        assert (r["wrong accept"], r["crash"], r["hang"], r.get("honest refused", 0)) == (0, 0, 0, 0), (
            name, r["examples"])  # fmt: skip


def test_bytes_to_reach_takes_the_first_round_at_or_below_the_target():
    bytes_curve = load("bytes_curve")
    points = [(1, 90.0, 100), (2, 70.0, 200), (3, 75.0, 300), (4, 55.0, 400)]
    assert bytes_curve.bytes_to_reach(points, 80) == 200
    assert bytes_curve.bytes_to_reach(points, 70) == 200  # at or below
    assert bytes_curve.bytes_to_reach(points, 60) == 400
    assert bytes_curve.bytes_to_reach(points, 50) is None


def test_the_curve_sums_bytes_total_traffic_or_seconds_from_its_offset(tmp_path):
    from prismfl import rundir

    bytes_curve = load("bytes_curve")
    for rnd, fid, up, sec in [(1, None, 10, 2.0), (2, 40.0, 20, 3.0), (3, None, 30, 4.0), (4, 35.0, 40, 5.0)]:
        record = {"round": rnd, "domain_fid": fid, "upload_bytes": up, "download_bytes": 10 * up, "seconds": sec}
        rundir.append_metrics(tmp_path, record)
    assert bytes_curve.curve(tmp_path) == [(2, 40.0, 30), (4, 35.0, 100)]  # only the rounds with a quick FID
    assert bytes_curve.curve(tmp_path, "seconds") == [(2, 40.0, 5.0), (4, 35.0, 14.0)]
    assert bytes_curve.curve(tmp_path, "total") == [(2, 40.0, 30 + 300), (4, 35.0, 100 + 1000)]
    assert bytes_curve.curve(tmp_path, "seconds", offset=100.0) == [(2, 40.0, 105.0), (4, 35.0, 114.0)]
    # a run whose model file records set-up traffic (no public images): the total starts there
    import torch

    from prismfl import modelfile
    from prismfl.capabilities import MASK_MODEL
    from prismfl.model import masked
    from prismfl.model.generators import ArchSpec, build_generator

    spec = ArchSpec("mlp", 4, 8, 1, 28, weight_seed=3)
    mask = torch.ones(masked.num_maskable(build_generator(spec)), dtype=torch.bool)
    info = {"dataset": "fashion-mnist", "setup_traffic": {"up": 5000, "down": 700}}
    (tmp_path / MASK_MODEL).write_bytes(modelfile.to_bytes(modelfile.PrismModel(spec, mask, info)))
    assert bytes_curve.curve(tmp_path, "total") == [(2, 40.0, 5700 + 330), (4, 35.0, 5700 + 1100)]
    assert bytes_curve.curve(tmp_path) == [(2, 40.0, 30), (4, 35.0, 100)]  # the uploads alone: rounds only


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs FashionMNIST")
def test_the_warm_start_alone_is_what_a_run_starts_from(monkeypatch, tmp_path):
    """The model of the warm start alone is the mode of the round-0 scores that a run of the same config
    trains and starts its rounds from (captured from the run's own warm start)."""
    from prismfl.config import load_config
    from prismfl.errors import PrismError
    from prismfl.fl import simulate, wire
    from prismfl.fl.methods import prism

    warm = load("warm_start_only")
    cfg = load_config(ROOT / "configs" / "smoke.toml", ["train.warm_start=20", "train.rounds=1"])
    model = warm.warm_start_model(cfg, log=lambda *_: None)
    seen, real = [], prism.Prism.warm_start
    monkeypatch.setattr(prism.Prism, "warm_start", lambda self, state, message: seen.append(message) or real(
        self, state, message))  # fmt: skip
    simulate.train(cfg, tmp_path / "run", log=lambda *_: None)
    table_hash = wire.HEADER.unpack_from(seen[0])[7]  # (the header's layer-table hash field)
    _, scores = wire.decode_state(seen[0], num_weights=model.mask.numel(), table_hash=table_hash)
    assert model.mask.equal(scores > 0) and model.info["rounds"] == 0
    assert model.info["warm_start"]["source"] == "the clients' pooled statistics"
    with pytest.raises(PrismError, match="train.warm_start > 0"):
        warm.warm_start_model(load_config(ROOT / "configs" / "smoke.toml"), log=lambda *_: None)
