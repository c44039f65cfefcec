"""Sub-class modes (model.modes): k-means modes fitted on public images, condition codes class * K + mode,
the generator and model file that carry them, sampling by class, and a run end to end."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_fmnist
from prismfl import modelfile
from prismfl.data.modes import Modes, fit_modes
from prismfl.errors import ConfigError, ModelFileError
from prismfl.model import masked
from prismfl.model.generators import ArchSpec, build_generator, count_weights

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
MODES = ["model.conditional=true", "model.modes=2", 'loss.features="public"', "train.batch_size=40"]


def _blobs(n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class 0: two kinds of 4x4 images (top row lit, or bottom row lit); class 1: one kind (left column)."""
    images, labels, kinds = [], [], []
    for i in range(n):
        x = rng.uniform(0, 0.1, size=(1, 4, 4))
        kind = i % 3
        if kind == 0:
            x[0, 0, :] += 0.9
        elif kind == 1:
            x[0, 3, :] += 0.9
        else:
            x[0, :, 0] += 0.9
        images.append(x), labels.append(0 if kind < 2 else 1), kinds.append(kind)
    return np.stack(images), np.array(labels), np.array(kinds)


def test_modes_separate_the_kinds_within_a_class_and_codes_are_class_times_k_plus_mode():
    images, labels, kinds = _blobs(300, np.random.default_rng(0))
    modes = fit_modes(images, labels, 2, 2, seed=7)
    codes = modes.codes(images, labels)
    assert np.array_equal(codes // 2, labels)
    # class 0's two kinds land in two different modes, each kind in one mode only
    top, bottom = set(codes[kinds == 0].tolist()), set(codes[kinds == 1].tolist())
    assert len(top) == len(bottom) == 1 and top != bottom and top | bottom == {0, 1}
    # the same seed, the same modes; k = 1 gives the classes themselves
    assert np.array_equal(fit_modes(images, labels, 2, 2, seed=7).codes(images, labels), codes)
    assert np.array_equal(fit_modes(images, labels, 2, 1, seed=7).codes(images, labels), labels)
    # uint8 images with scale 1/255 give the same codes as the same images in [0, 1]
    as_bytes = np.round(images * 255).astype(np.uint8)
    assert np.array_equal(modes.codes(as_bytes, labels, scale=1 / 255), modes.codes(as_bytes / 255, labels))


def test_codes_are_the_nearest_centre_in_the_class_coordinates_by_hand():
    # one class, pixels (a, b): mean (0, 0), basis the identity, centres (1, 0), (0, 1), (-1, -1)
    modes = Modes(3, [np.zeros(2)], [np.eye(2)], [np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])])
    points = np.array([[0.9, 0.2], [0.1, 2.0], [-0.3, -0.6], [0.6, 0.55]])
    assert modes.codes(points, np.zeros(4, dtype=np.int64)).tolist() == [0, 1, 2, 0]  # (0.6, 0.55): 0.1825 < 0.2125


def test_a_class_with_too_few_public_images_keeps_one_mode_and_bad_input_is_refused():
    images, labels, _ = _blobs(30, np.random.default_rng(1))
    labels[labels == 1] = 2  # class 1 has no image, class 2 has ten
    modes = fit_modes(images, labels, 3, 6, seed=0)  # 6 modes need 12 images: class 2 has 10
    codes = modes.codes(images, labels)
    assert set(codes[labels == 2].tolist()) == {12}  # class 2, mode 0
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        modes.codes(images, np.full(len(images), 3))
    with pytest.raises(ValueError, match="modes fitted on images of 16 values"):
        modes.codes(np.zeros((2, 1, 5, 5)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="modes must be >= 1"):
        fit_modes(images, labels, 3, 0, seed=0)


# ---------------------------------------------------------------- generator and model file


def _spec(modes=3):
    return ArchSpec("mlp-up", z_dim=8, width=16, channels=1, img_size=8, weight_seed=3, num_classes=10, modes=modes)


def test_the_generator_takes_one_input_per_code_and_the_spec_keeps_old_bytes():
    assert count_weights(_spec(3)) - count_weights(_spec(1)) == 20 * 16  # 30 codes instead of 10, width 16
    net = build_generator(_spec(3))
    assert masked.num_maskable(net) == count_weights(_spec(3))
    with pytest.raises(ValueError, match=r"condition codes \(class x 3 \+ mode\) must be in 0..29"):
        net(torch.zeros(1, 8), torch.tensor([30]))
    assert "modes" not in _spec(1).to_dict() and _spec(3).to_dict()["modes"] == 3
    with pytest.raises(ValueError, match="modes must be an integer in"):
        _spec(65).validate()
    with pytest.raises(ValueError, match="splits the classes of a class-conditional generator"):
        ArchSpec("mlp", modes=2).validate()


def _model(shares):
    spec = _spec(3).validate()
    mask = torch.rand(count_weights(spec), generator=torch.Generator().manual_seed(0)) < 0.5
    return modelfile.PrismModel(spec, mask, {"dataset": "fashion-mnist"}, shares)


def _shares():
    """Class 1 only in mode 2, class 4 in modes 0 and 1 (1:3); every other code 0."""
    shares = [0.0] * 30
    shares[1 * 3 + 2], shares[4 * 3 + 0], shares[4 * 3 + 1] = 0.5, 0.125, 0.375
    return shares


def test_a_model_file_with_modes_round_trips_and_bad_mode_fields_are_refused():
    from test_conditional import _rewrite

    data = modelfile.to_bytes(_model(_shares()))
    back = modelfile.from_bytes(data)
    assert back.spec == _spec(3) and back.class_shares == _shares()
    bad = [(lambda h: h["arch"].update(modes=1), "modes is written only when"),
           (lambda h: h.update(class_shares=[0.1] * 10), "a list of 30 numbers"),
           (lambda h: h["arch"].update(modes=10**4), "modes must be an integer")]  # fmt: skip
    for edit, needle in bad:
        with pytest.raises(ModelFileError, match=needle):
            modelfile.from_bytes(_rewrite(data, edit))


def test_sampling_with_modes_returns_classes_and_draws_each_class_mode_from_its_shares():
    net = modelfile.materialize(_model(_shares()))
    images, labels = modelfile.sample_labelled(net, 400, seed=3)
    assert set(labels.tolist()) == {1, 4} and abs(float((labels == 1).float().mean()) - 0.5) < 0.08
    # asked for classes: the generator is given codes, each class's mode drawn from its mode shares
    seen = []
    forward = net.forward
    net.forward = lambda z, y: seen.append(y) or forward(z, y)
    asked = torch.tensor([1] * 4 + [4] * 400)
    images, labels = modelfile.sample_labelled(net, 0, seed=3, labels=asked)
    codes = torch.cat(seen)
    assert torch.equal(labels, asked) and images.shape == (404, 1, 8, 8)
    assert codes[:4].tolist() == [5] * 4  # class 1's only mode is 2
    assert set(codes[4:].tolist()) == {12, 13} and abs(float((codes[4:] == 13).float().mean()) - 0.75) < 0.07
    # class 4: modes 0 and 1 at 1:3; a class of share 0 draws its modes uniformly
    shares = modelfile.mode_shares(net)
    assert shares[4].tolist() == [0.25, 0.75, 0.0] and shares[0].tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="class labels must be in 0..9"):
        modelfile.sample_labelled(net, 0, labels=torch.tensor([10]))


# ---------------------------------------------------------------- configuration and a run


def test_config_refuses_modes_without_a_conditional_model_or_a_big_enough_batch():
    from prismfl.config import load_config

    with pytest.raises(ConfigError, match="set model.conditional = true"):
        load_config(SMOKE, ["model.modes=2"])
    # without a public hold-out the modes come from the federation (tests/test_no_public.py), not refused
    assert load_config(SMOKE, ["model.conditional=true", "model.modes=2", "train.batch_size=40"]).model.modes == 2
    with pytest.raises(ConfigError, match=r"with 2 modes needs train.batch_size >= 40"):
        load_config(SMOKE, [*MODES, "train.batch_size=32"])
    with pytest.raises(ConfigError, match="modes must be an integer in"):
        load_config(SMOKE, [*MODES, "model.modes=0"])
    assert load_config(SMOKE, MODES).arch_spec().codes == 20


@needs_fmnist
def test_a_run_with_modes_trains_on_codes_and_samples_by_class(tmp_path, run_cli):
    from prismfl.config import load_config
    from prismfl.data import federation
    from prismfl.fl import simulate

    cfg = load_config(SMOKE, MODES)
    fed = federation.prepare_federation(cfg)
    codes = fed.labels(np.arange(len(fed.train.labels)))
    assert torch.equal(codes // 2, torch.from_numpy(fed.train.labels.astype(np.int64)))
    assert len(set(codes[fed.public_idx].tolist())) == 20  # every class's public images fill both its modes
    simulate.train(cfg, tmp_path / "run", log=lambda *_: None)
    model = modelfile.load(tmp_path / "run" / "model.prism")
    assert model.spec.modes == 2 and len(model.class_shares) == 20
    private = np.concatenate(fed.parts)
    expected = np.bincount(codes[private].numpy(), minlength=20) / len(private)
    assert model.class_shares == pytest.approx(expected.tolist())
    code, out, err = run_cli("sample", str(tmp_path / "run"), "--class", "bag", "--n", "4",
                             "--out", str(tmp_path / "b.npz"))  # fmt: skip
    assert code == 0, err
    with np.load(tmp_path / "b.npz", allow_pickle=False) as f:
        assert f["labels"].tolist() == [8] * 4
    code, out, err = run_cli("info", str(tmp_path / "run" / "model.prism"))
    assert code == 0 and "classes=10 (conditional) modes=2 per class" in out
    report = (tmp_path / "run" / "report.md").read_text()
    assert "(width 64, 2 modes a class)" in report and "codes a step" not in report


@needs_fmnist
def test_a_private_run_with_modes_reports_a_class_table_per_class_and_warns_per_mode(tmp_path, capsys):
    """With privacy each client's noisy counts are per mode: the server's class table sums them per class,
    and a mode the noise would swamp is named by its class and mode."""
    from prismfl.config import load_config
    from prismfl.data.sources import dataset_info
    from prismfl.fl import simulate

    simulate.train(load_config(SMOKE, [*MODES, "privacy.epsilon=1", "train.rounds=1"]), tmp_path / "run",
                   log=lambda *_: None)  # fmt: skip
    header = (tmp_path / "run" / "partition.txt").read_text().splitlines()[0].split()
    assert header == ["client", *dataset_info("fashion-mnist").class_names, "total"]
    err = capsys.readouterr().err
    assert "warning: Sandal, mode 1: " in err and "class 1" not in err  # not "class N" by the code's index
    assert len(modelfile.load(tmp_path / "run" / "model.prism").class_shares) == 20


# ---------------------------------------------------------------- a random subset of the codes per step


def _three_codes():
    from prismfl.loss.matching import FeatureStats

    mean = [torch.tensor([[1.0, 2.0], [-1.0, 0.5], [3.0, -1.0]])]
    var = [torch.tensor([[0.5, 0.5], [1.0, 2.0], [2.0, 1.0]])]
    return FeatureStats(mean, var, 60, torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64))


def test_codes_per_step_draws_that_many_codes_each_step_from_the_generator():
    from prismfl.loss.matching import ConditionalMatching

    loss = ConditionalMatching(_three_codes(), codes_per_step=2)
    assert loss.redraws and not ConditionalMatching(_three_codes()).redraws
    gen = torch.Generator().manual_seed(3)
    draws = [loss.labels(6, generator=gen) for _ in range(40)]
    for labels in draws:  # two codes, in order, each held by 3 of the 6 images
        a, b = labels[:2].tolist()
        assert a < b and labels.tolist() == [a, b] * 3
    assert {tuple(d[:2].tolist()) for d in draws} == {(0, 1), (0, 2), (1, 2)}
    again = torch.Generator().manual_seed(3)
    assert all(torch.equal(d, loss.labels(6, generator=again)) for d in draws)
    with pytest.raises(ValueError, match="needs a random generator"):
        loss.labels(6)
    with pytest.raises(ValueError, match="two images of each of 2 classes a step; .* at least 4"):
        loss.labels(3, generator=gen)
    with pytest.raises(ValueError, match="codes_per_step must be >= 0"):
        ConditionalMatching(_three_codes(), codes_per_step=-1)


def _groups() -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {c: torch.randn(3, 2, generator=gen) for c in range(3)}


def _grads(loss, groups: dict[int, torch.Tensor], codes) -> dict[int, torch.Tensor]:
    leaves = {c: groups[c].clone().requires_grad_(True) for c in codes}
    fake = torch.cat([leaves[c] for c in codes])
    labels = torch.tensor(codes).repeat_interleave(3)
    surrogate, _ = loss([fake], None, labels)
    surrogate.backward()
    return {c: leaves[c].grad for c in codes}


def test_codes_per_step_weighs_the_drawn_codes_so_the_expected_gradient_is_the_full_one():
    """k = 3 codes, m = 2 a step: each of the 3 equally likely pairs is weighed by k / m = 1.5, so the mean
    over the pairs of each code's gradient equals the gradient of the loss over all three."""
    from prismfl.loss.matching import ConditionalMatching

    groups = _groups()
    full = _grads(ConditionalMatching(_three_codes()), groups, [0, 1, 2])
    subset = ConditionalMatching(_three_codes(), codes_per_step=2)
    mean = {c: torch.zeros(3, 2) for c in range(3)}
    for pair in ([0, 1], [0, 2], [1, 2]):
        for c, g in _grads(subset, groups, pair).items():
            mean[c] += g / 3
        one = _grads(subset, groups, pair)
        assert all(torch.allclose(one[c], 1.5 * full[c]) for c in pair)  # each drawn code: 1.5x its term
    assert all(torch.allclose(mean[c], full[c], atol=1e-6) for c in range(3))
    with pytest.raises(ValueError, match="holds a class this loss does not match"):
        subset([torch.zeros(4, 2)], None, torch.tensor([0, 0, 5, 5]))


def test_codes_per_step_moves_only_the_drawn_codes_trackers_each_starting_at_its_first_gap():
    from prismfl import safestate
    from prismfl.loss.matching import ConditionalMatching
    from prismfl.loss.trackers import TrackerState

    loss = ConditionalMatching(_three_codes(), tracker="ema", tracker_beta=0.9, codes_per_step=2)
    groups, tracker = _groups(), TrackerState()
    mean = lambda c, x=1.0: (x * groups[c]).mean(0)  # noqa: E731 - a generated group's mean
    loss([torch.cat([groups[0], groups[2]])], tracker, torch.tensor([0, 2]).repeat_interleave(3))
    target = loss.targets[0]  # the means of codes 0, 1, 2: (3, 2); the trackers are stacked alike
    assert [v.shape for v in tracker.vectors] == [(3, 2), (3, 2)] and tracker.started.tolist() == [True, False, True]
    assert torch.allclose(tracker.vectors[0][0], target[0] - mean(0))
    assert torch.allclose(tracker.vectors[0][2], target[2] - mean(2))
    assert float(tracker.vectors[0][1].abs().sum()) == 0.0
    saved = TrackerState.from_state_dict(safestate.from_bytes(safestate.to_bytes(tracker.state_dict())))
    assert saved.started.tolist() == [True, False, True] and torch.equal(saved.vectors[0], tracker.vectors[0])
    first = tracker.vectors[0].clone()
    loss([torch.cat([groups[1] * 2, groups[2] * 2])], tracker, torch.tensor([1, 2]).repeat_interleave(3))
    assert torch.equal(tracker.vectors[0][0], first[0])  # not drawn: unchanged
    assert torch.allclose(tracker.vectors[0][1], target[1] - mean(1, 2.0))  # its first gap
    assert torch.allclose(tracker.vectors[0][2], 0.9 * first[2] + 0.1 * (target[2] - mean(2, 2.0)))
    stale = TrackerState([torch.zeros(2)] * 6)  # a layout of before the statistics were stacked: started afresh
    loss([torch.cat([groups[0], groups[1]])], stale, torch.tensor([0, 1]).repeat_interleave(3))
    assert [v.shape for v in stale.vectors] == [(3, 2), (3, 2)] and stale.started.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="needs the 'ema' tracker"):
        adam = ConditionalMatching(_three_codes(), tracker="adam", codes_per_step=2)
        adam([torch.cat([groups[1], groups[2]])], TrackerState(), torch.tensor([1, 2]).repeat_interleave(3))


def test_config_checks_codes_per_step():
    from prismfl.config import load_config

    small = [*MODES[:-1], "train.batch_size=16"]
    with pytest.raises(ConfigError, match=r"or loss.codes_per_step <= 8 \(that many drawn at random"):
        load_config(SMOKE, small)
    assert load_config(SMOKE, [*small, "loss.codes_per_step=8"]).loss.codes_per_step == 8
    with pytest.raises(ConfigError, match="codes_per_step = 9 needs train.batch_size >= 18"):
        load_config(SMOKE, [*small, "loss.codes_per_step=9"])
    with pytest.raises(ConfigError, match=r"an integer in 1..20"):
        load_config(SMOKE, [*MODES, "loss.codes_per_step=21"])
    with pytest.raises(ConfigError, match="an integer in 1..classes"):
        load_config(SMOKE, ["loss.codes_per_step=2"])
    with pytest.raises(ConfigError, match="needs loss.tracker = 'ema' or 'none'"):
        load_config(SMOKE, [*MODES, "loss.codes_per_step=4", 'loss.tracker="adam"'])
