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


def test_variant_tables_name_real_config_keys():
    from prismfl.config import load_config

    for name in ("ablation", "fed_sweep"):
        for overrides in load(name).VARIANTS.values():
            # as the scripts load them: the unconditional demo, cold, plus the variant (raises on a bad key or value)
            load_config(
                ROOT / "configs" / "fmnist-public.toml",
                [*load("steps").BEFORE_MODES, "model.conditional=false", "train.warm_start=0", *overrides],
            )
    conditional = load("conditional")
    for _, overrides in conditional.VARIANTS.values():
        if overrides is not None:  # as the script loads them: its pinned settings, then the row's
            load_config(ROOT / "configs" / "fmnist-public.toml", [*conditional.BASE, *overrides])
    sweep = load("fed_sweep")
    for overrides in sweep.VARIANTS.values():
        load_config(ROOT / "configs" / "fmnist-public.toml", [*sweep.PINNED, *overrides])


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
    from prismfl.model import masked
    from prismfl.model.generators import ArchSpec, build_generator

    spec = ArchSpec("mlp", 4, 8, 1, 28, weight_seed=3)
    mask = torch.ones(masked.num_maskable(build_generator(spec)), dtype=torch.bool)
    info = {"dataset": "fashion-mnist", "setup_traffic": {"up": 5000, "down": 700}}
    (tmp_path / rundir.MODEL).write_bytes(modelfile.to_bytes(modelfile.PrismModel(spec, mask, info)))
    assert bytes_curve.curve(tmp_path, "total") == [(2, 40.0, 5700 + 330), (4, 35.0, 5700 + 1100)]
    assert bytes_curve.curve(tmp_path) == [(2, 40.0, 30), (4, 35.0, 100)]  # the uploads alone: rounds only


def test_temperature_screen_scales_only_the_noise():
    """T = 1 draws exactly what modelfile.sample_labelled draws; T = 2 the same labels from 2x the noise."""
    import torch

    from prismfl import modelfile
    from prismfl.model.generators import ArchSpec, count_weights

    spec = ArchSpec("mlp-up", z_dim=8, width=16, channels=1, img_size=8, weight_seed=3, num_classes=10).validate()
    mask = torch.rand(count_weights(spec), generator=torch.Generator().manual_seed(0)) < 0.5
    net = modelfile.materialize(modelfile.PrismModel(spec, mask, {"dataset": "fashion-mnist"}, [0.1] * 10))
    temperature, randn = load("temperature"), torch.randn
    images, labels = modelfile.sample_labelled(net, 12, seed=4)
    same, same_labels = temperature.scaled_sample(net, 12, 4, 1.0)
    assert torch.equal(images, same) and torch.equal(labels, same_labels)
    wide, wide_labels = temperature.scaled_sample(net, 12, 4, 2.0)
    assert torch.equal(wide_labels, labels) and not torch.allclose(wide, images)
    assert torch.randn is randn  # restored


def test_the_probability_space_step_moves_probabilities_by_hand_computed_amounts():
    """benchmarks/server_step.py --step probability: p' = clamp(p + step (beta v + theta_hat - p)), and
    MADA's blend of probabilities; importing it patches nothing (only running it as a script does)."""
    import math

    import torch

    from prismfl.fl import aggregate

    blend, momentum_step = aggregate.blend, aggregate.momentum_step
    space = load("server_step")
    assert aggregate.blend is blend and aggregate.momentum_step is momentum_step
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    old = torch.tensor([0.0, logit(0.9), 0.0])  # p = 0.5, 0.9, 0.5
    proposal = torch.tensor([logit(0.8), logit(0.01), logit(0.99)])
    velocity = torch.tensor([0.1, 0.0, 0.0])
    new, v = space.probability_momentum_step(old, proposal, velocity, 0.5, 0.5, 0.01)
    # v = 0.5 * [0.1, 0, 0] + [0.3, -0.89, 0.49]; p' = p + 0.5 v = [0.675, 0.455, 0.745]
    assert torch.allclose(v, torch.tensor([0.35, -0.89, 0.49]), atol=1e-6)
    assert torch.allclose(torch.sigmoid(new), torch.tensor([0.675, 0.455, 0.745]), atol=1e-6)
    clamped, _ = space.probability_momentum_step(old, proposal, torch.tensor([0.0, 0.0, 2.0]), 1.0, 1.0, 0.01)
    assert torch.sigmoid(clamped)[2].item() == pytest.approx(0.99, abs=1e-6)  # 0.5 + 2.49, held at 1 - s
    mixed = space.probability_blend(old, proposal, 0.25)  # 0.25 theta_hat + 0.75 p
    assert torch.allclose(torch.sigmoid(mixed), torch.tensor([0.575, 0.6775, 0.6225]), atol=1e-6)
    assert space.probability_blend(old, proposal, None) is proposal  # no MADA: the proposal itself


def test_the_server_adam_screen_takes_bias_corrected_steps():
    """benchmarks/server_step.py --step adam, two rounds by hand (beta 0.5, beta2 0.5, eta 2, tau 1)."""
    import math

    import torch

    adam = load("server_step").ServerAdam(eta=2.0, tau=1.0, beta2=0.5)
    s, m = torch.tensor([0.0, 1.0]), torch.zeros(2)
    s1, m = adam(s, torch.tensor([3.0, -1.0]), m, 0.5, 0.5, 0.01)  # g = [3, -2]
    # m = [1.5, -1], m_hat = [3, -2]; u = [4.5, 2], u_hat = [9, 4]; s += 2 * 0.5 * m_hat / (sqrt(u_hat) + 1)
    assert torch.allclose(m, torch.tensor([1.5, -1.0])) and torch.allclose(s1, torch.tensor([0.75, 1 / 3]))
    s2, m = adam(s1, torch.tensor([0.75, 10.0]), m, 0.5, 1.0, 0.01)  # g = [0, 29 / 3]
    # m = [0.75, 13 / 3], m_hat = m / 0.75; u = [2.25, 1 + (29 / 3)^2 / 2], u_hat = u / 0.75
    u_hat = (1 + (29 / 3) ** 2 / 2) / 0.75
    expected = torch.tensor([0.75 + 2 / (3**0.5 + 1), 1 / 3 + 2 * (13 / 3 / 0.75) / (u_hat**0.5 + 1)])
    assert torch.allclose(m, torch.tensor([0.75, 13 / 3])) and torch.allclose(s2, expected, atol=1e-6)
    s3, _ = adam(s2, torch.tensor([40.0, 10.0]), m, 0.5, 10.0, 0.01)  # a large step is held at logit(0.99)
    assert s3[0].item() == pytest.approx(math.log(99), abs=1e-5)


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
