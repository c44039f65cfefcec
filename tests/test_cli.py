"""Bad input: one line naming the problem, exit code 2, no traceback, nothing half-written."""

from pathlib import Path

import pytest

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")


def _one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prismfl: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--set", "train.round=5"], ["unknown config key 'train.round'", "did you mean 'train.rounds'"]),
        (["--set", "train.rounds=many"], ["train.rounds must be int"]),
        (
            ["--set", "partition.alpha=0", "--set", "partition.scheme=dirichlet"],
            ["partition.alpha must be a finite number in"],
        ),
        (
            ["--set", "partition.num_clients=5000", "--set", "train.client_fraction=0.01"],
            ["5000 clients but only", "use fewer clients"],
        ),
        (["--set", "data.root=/nonexistent/fm"], ["/nonexistent/fm", "data.root"]),
        (["--set", "loss.features=vgg19bn", "--set", "loss.vgg_weights=/no/vgg.pth"], ["/no/vgg.pth"]),
    ],
)
def test_train_errors(run_cli, tmp_path, args, needles):
    out = tmp_path / "run"
    code, _, err = run_cli("train", "--config", SMOKE, "--out", str(out), "-q", *args)
    _one_line_error(code, err, *needles)
    assert not out.exists()  # nothing half-written


def test_missing_config_file(run_cli, tmp_path):
    code, _, err = run_cli("train", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "r"))
    _one_line_error(code, err, "config file not found")


def test_resume_without_checkpoint(run_cli, tmp_path):
    code, _, err = run_cli("train", "--config", SMOKE, "--out", str(tmp_path / "r"), "--resume")
    _one_line_error(code, err, "no checkpoint")


@pytest.mark.parametrize("content", [b"", b"not a model at all, just some text that is long enough......."])
def test_unreadable_model_file(run_cli, tmp_path, content):
    bad = tmp_path / "bad.prism"
    bad.write_bytes(content)
    for cmd in (["sample", str(bad), "--out", str(tmp_path / "x.png")], ["info", str(bad)]):
        code, _, err = run_cli(*cmd)
        _one_line_error(code, err, "bad.prism")
    assert not (tmp_path / "x.png").exists()


def test_missing_model_file(run_cli, tmp_path):
    code, _, err = run_cli("sample", str(tmp_path / "none.prism"))
    _one_line_error(code, err, "not found")


def test_directory_that_is_not_a_run(run_cli, tmp_path):
    code, _, err = run_cli("export", str(tmp_path), "--out", str(tmp_path / "m.prism"))
    _one_line_error(code, err, "not a prismfl run directory")


def test_bad_sample_count(run_cli, tmp_path):
    code, _, err = run_cli("sample", str(tmp_path / "m.prism"), "--n", "0")
    _one_line_error(code, err, "--n must be in 1..100,000")


def test_usage_error_exits_2(run_cli):
    code, _, _ = run_cli("train", "--no-such-flag")
    assert code == 2
