"""Hostile and broken inputs: every case is one clear line and exit code 2, never a traceback, never
an allocation the input asked for, never code run from a file."""

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import needs_fmnist
from prismfl import modelfile
from prismfl.config import load_config
from prismfl.errors import ConfigError, DataError, ModelFileError
from prismfl.model import masked
from prismfl.model.generators import ArchSpec, build_generator

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")
SPEC = ArchSpec("mlp", 4, 8, 1, 28, weight_seed=3)


def one_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("prismfl: error: "), (code, err)
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def model_bytes(**arch) -> bytes:
    """A model file whose header's arch fields are replaced, with its sha256 recomputed."""
    n = masked.num_maskable(build_generator(SPEC))
    data = modelfile.to_bytes(modelfile.PrismModel(SPEC, torch.zeros(n, dtype=torch.bool)))
    head_len = struct.unpack_from("<I", data, 8)[0]
    header = json.loads(data[12 : 12 + head_len])
    header["arch"].update(arch)
    head = json.dumps(header).encode()
    return forge_model(head, data[12 + head_len : -32])


def forge_model(head: bytes, payload: bytes) -> bytes:
    body = modelfile.MAGIC + struct.pack("<HI", modelfile.VERSION, len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize(
    "arch, needle",
    [
        ({"z_dim": 0}, "z_dim"),
        ({"z_dim": -4}, "z_dim"),
        ({"z_dim": 4.0}, "z_dim"),
        ({"z_dim": "4"}, "z_dim"),
        ({"z_dim": None}, "z_dim"),
        ({"width": 10**6}, "width"),
        ({"z_dim": 2**40}, "z_dim"),
        ({"width": 4096, "img_size": 256, "channels": 3}, "limit"),  # legal fields, a network too large
        ({"weight_seed": 2**64}, "weight_seed"),
        ({"weight_seed": "x"}, "weight_seed"),
        ({"img_size": -28}, "img_size"),
        ({"channels": 2}, "channels"),
        ({"name": "vit"}, "architecture"),
        ({"extra": 1}, "keys"),
    ],
)
def test_model_file_headers_out_of_range_are_one_line(tmp_path, run_cli, arch, needle):
    path = tmp_path / "m.prism"
    path.write_bytes(model_bytes(**arch))
    for command in (["info", str(path)], ["sample", str(path), "--out", str(tmp_path / "s.png")]):
        one_line(*run_cli(*command)[::2], needle)


def test_a_deeply_nested_or_overlong_header_is_one_line(tmp_path, run_cli):
    path = tmp_path / "m.prism"
    path.write_bytes(forge_model(b"[" * 100_000 + b"]" * 100_000, b""))
    one_line(*run_cli("info", str(path))[::2], "unreadable header")
    good = model_bytes()
    path.write_bytes(forge_model(good[12 : 12 + struct.unpack_from("<I", good, 8)[0]], b"\0" * 7))
    one_line(*run_cli("info", str(path))[::2], "takes")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4), st.integers(0, 40), st.booleans())
def test_fuzz_model_files_load_or_raise_model_file_error(edits, cut, reseal):
    data = bytearray(model_bytes())
    for pos, value in edits:
        data[pos % len(data)] = value
    data = bytes(data[: len(data) - cut])
    if reseal and len(data) > 32:
        data = data[:-32] + hashlib.sha256(data[:-32]).digest()
    try:
        model = modelfile.from_bytes(data)
    except ModelFileError:
        return
    assert model.mask.numel() == masked.num_maskable(build_generator(model.spec))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_config_text_loads_or_raises_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError:
        pass


KEYS = ["seed", "train.lr", "train.batch_size", "model.z_dim", "model.width", "loss.feature_width", "train.rounds",
        "partition.num_clients", "faults.dropout", "privacy.epsilon"]  # fmt: skip
VALUES = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=5), st.booleans())


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(KEYS), VALUES)
def test_fuzz_config_values_load_or_raise_config_error(key, value):
    try:
        load_config(SMOKE, [f"{key}={json.dumps(value) if isinstance(value, str) else value}"])
    except ConfigError:
        pass


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["seed=18446744073709551616"], "seed"),
        (["train.lr=1e308"], "train.lr"),
        (["train.lr=inf"], "train.lr"),
        (["train.lr=nan"], "train.lr"),
        (["train.batch_size=1000000000"], "train.batch_size"),
        (["model.z_dim=1000000000"], "z_dim"),
        (["model.width=1000000000"], "width"),
        (["loss.feature_width=1000000000"], "feature_width"),
        (["faults.dropout=1.5"], "faults.dropout"),
        (['robust.rule="krum"'], "robust.rule"),
        # issue 35: these passed validation, then failed in training and left files behind
        (
            ['loss.tracker="adam"', "loss.tracker_lr=nan"],
            "loss.tracker_lr must be a finite number in (0, 100], got nan",
        ),
        (["train.eval_every=-1"], "train.eval_every must be an integer in [0, 1000000], got -1"),
        (["privacy.clip=inf"], "privacy.clip"),
        (['partition.scheme="dirichlet"', "partition.alpha=1e-300"], "partition.alpha"),
    ],
)
def test_train_values_out_of_range_are_one_line(run_cli, tmp_path, sets, needle):
    args = [x for s in sets for x in ("--set", s)]
    one_line(*run_cli("train", "--config", SMOKE, "--out", str(tmp_path / "r"), "-q", *args)[::2], needle)
    assert not (tmp_path / "r").exists()


def test_config_files_that_are_not_text_or_not_files_are_one_line(run_cli, tmp_path):
    (tmp_path / "bin.toml").write_bytes(b"seed = 1\n\xff\xfe\x00")
    one_line(*run_cli("train", "--config", str(tmp_path / "bin.toml"), "--out", str(tmp_path / "r"))[::2], "UTF-8")
    (tmp_path / "dir.toml").mkdir()
    one_line(*run_cli("train", "--config", str(tmp_path / "dir.toml"), "--out", str(tmp_path / "r"))[::2], "directory")


@needs_fmnist
def test_out_paths_that_cannot_be_written_are_one_line(run_cli, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line(*run_cli("train", "--config", SMOKE, "--out", str(tmp_path / "file" / "run"), "-q")[::2])
    one_line(*run_cli("train", "--config", SMOKE, "--out", "/proc/prismfl-run", "-q")[::2])


@needs_fmnist
def test_sample_writes_what_its_extension_says(run_cli, tmp_path):
    path = tmp_path / "m.prism"
    modelfile.save(modelfile.PrismModel(SPEC, torch.ones(masked.num_maskable(build_generator(SPEC)), dtype=torch.bool)),
                   path)  # fmt: skip
    assert run_cli("sample", str(path), "--n", "5", "--out", str(tmp_path / "a.npy"))[0] == 0
    a = np.load(tmp_path / "a.npy", allow_pickle=False)
    assert a.shape == (5, 1, 28, 28) and a.dtype == np.float32 and -1 <= a.min() <= a.max() <= 1
    assert run_cli("sample", str(path), "--n", "5", "--out", str(tmp_path / "a.npz"))[0] == 0
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert np.array_equal(z["images"], a)
    assert run_cli("sample", str(path), "--n", "5", "--out", str(tmp_path / "a.png"))[0] == 0
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_line(*run_cli("sample", str(path), "--out", str(tmp_path / "a.jpg"))[::2], ".jpg")
    one_line(*run_cli("sample", str(path), "--out", str(tmp_path))[::2], "is a directory")
    one_line(*run_cli("sample", str(path), "--n", "1000000000", "--out", str(tmp_path / "b.png"))[::2], "--n")


def test_small_commands_refuse_bad_numbers(run_cli, tmp_path):
    one_line(*run_cli("privacy", "--epsilon", "1", "--images", "0")[::2], "--images")
    one_line(*run_cli("privacy", "--epsilon", "1", "--images", "-5")[::2], "--images")
    one_line(*run_cli("privacy", "--epsilon", "1", "--layers", "-1")[::2], "--layers")
    one_line(*run_cli("grid", "--config", SMOKE, "--seeds", "a", "--out", str(tmp_path / "g"))[::2], "--seeds")


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"x" * 100, struct.pack("<Q", 2**62) + b"{}"])
def test_corrupt_checkpoints_are_one_line(run_cli, tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(content)
    for command in (["info", str(run)], ["sample", str(run), "--out", str(tmp_path / "s.png")],
                    ["export", str(run), "--out", str(tmp_path / "m.prism")], ["evaluate", str(run)]):  # fmt: skip
        one_line(*run_cli(*command)[::2])


def write_idx_images(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from prismfl.data.idx import write_idx

    for stem in ("train", "t10k"):
        write_idx(folder / f"{stem}-images-idx3-ubyte", images)
        write_idx(folder / f"{stem}-labels-idx1-ubyte", labels)


def test_nan_pixels_and_bad_labels_are_data_errors(tmp_path):
    from prismfl.data.sources import load_split

    images = np.zeros((20, 28, 28), dtype=np.float32)
    images[3, 4, 5] = np.nan
    write_idx_images(tmp_path, images, np.zeros(20, dtype=np.uint8))
    with pytest.raises(DataError, match="NaN"):
        load_split("fashion-mnist", "train", str(tmp_path))
    write_idx_images(tmp_path, np.zeros((20, 28, 28), dtype=np.uint8), np.full(20, 12, dtype=np.uint8))
    with pytest.raises(DataError, match="labels must be integers in 0..9"):
        load_split("fashion-mnist", "train", str(tmp_path))


def test_an_idx_header_whose_sizes_overflow_is_a_data_error(tmp_path):
    from prismfl.data.idx import read_idx

    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + (2**31).to_bytes(4, "big") * 3 + b"\0" * 16)
    with pytest.raises(DataError, match="header promises"):
        read_idx(path)


@pytest.mark.parametrize(
    "server",
    [
        {
            "num_weights": 12704,
            "table_hash": 1,
            "scores": "not a tensor",
            "synced": [0],
            "delta_sizes": {},
            "deltas": {},
        },
        {
            "num_weights": 12704,
            "table_hash": 1,
            "scores": torch.zeros(5),
            "synced": [0],
            "delta_sizes": {},
            "deltas": {},
        },
        {"num_weights": 99, "table_hash": 1, "scores": torch.zeros(99), "synced": [0], "delta_sizes": {}, "deltas": {}},
        {
            "num_weights": 12704,
            "table_hash": 1,
            "scores": torch.full((12704,), float("nan")),
            "synced": [0],
            "delta_sizes": {},
            "deltas": {},
        },
        {
            "num_weights": 12704,
            "table_hash": 1,
            "scores": torch.zeros(12704),
            "synced": "x",
            "delta_sizes": {},
            "deltas": {},
        },
    ],
)
def test_a_checkpoint_whose_state_does_not_fit_the_method_is_one_line(run_cli, tmp_path, server):
    from prismfl import rundir

    cfg = load_config(SMOKE, ["model.z_dim=4", "model.width=8", "partition.num_clients=1"])
    run = tmp_path / "run"
    run.mkdir()
    rundir.save_checkpoint(run, round_=1, cfg=cfg, transport="simulator", server=server, clients=None,
                           records=[{"round": 1}], model_info={})  # fmt: skip
    for command in (["info", str(run)], ["export", str(run), "--out", str(tmp_path / "m.prism")]):
        one_line(*run_cli(*command)[::2], "checkpoint")


def test_settings_that_do_not_apply_are_refused():
    with pytest.raises(ConfigError, match="robust.rule needs"):
        load_config(SMOKE, ['train.method="local"', 'robust.rule="distance"'])
    pytest.importorskip("flwr")
    from prismfl.flower import settings
    from prismfl.flower.payload import from_array

    with pytest.raises(ConfigError, match="faults"):
        settings.server_settings({"config-file": SMOKE, "overrides": "faults.dropout=0.1"})
    with pytest.raises(ValueError, match="payload"):
        from_array(b"raw bytes where an Array belongs")


# ---------------------------------------------------------------- files that are not files, and their sizes

# Runs the CLI on each argument list (split on \x1f) in one child process, under a memory limit and a timeout:
# a regression that reads /dev/zero without end or blocks on a pipe fails the test, never hangs the suite.
_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from prismfl.cli import main
for args in sys.argv[1:]:
    sys.argv = ["prismfl", *args.split("\\x1f")]
    try:
        main()
    except SystemExit as exc:
        print("exit", exc.code, flush=True)
        print("--", file=sys.stderr, flush=True)
"""


def test_devices_pipes_and_directories_are_refused_unread(tmp_path):
    import os
    import subprocess
    import sys

    fifo, fifo_toml = tmp_path / "fifo.prism", tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    os.mkfifo(fifo_toml)
    png = str(tmp_path / "s.png")
    commands = [["info", "/dev/zero"], ["sample", "/dev/zero", "--out", png], ["evaluate", "/dev/zero"],
                ["info", str(fifo)], ["sample", str(fifo), "--out", png], ["info", str(fifo_toml)],
                ["train", "--config", str(fifo_toml), "--out", str(tmp_path / "run")]]  # fmt: skip
    result = subprocess.run([sys.executable, "-c", _CHILD, *("\x1f".join(c) for c in commands)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.stdout.split("\n")[:-1] == ["exit 2"] * len(commands), (result.stdout, result.stderr[-2000:])
    errors = result.stderr.split("--\n")[:-1]
    assert len(errors) == len(commands)
    for err, command in zip(errors, commands, strict=True):
        one_line(2, err, "is not a regular file", next(a for a in command if a == "/dev/zero" or "fifo" in a))
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "run").exists()


def test_read_capped_reads_only_a_regular_file_within_its_cap(tmp_path):
    import os
    import threading

    from prismfl.errors import PrismError
    from prismfl.files import read_capped

    (tmp_path / "ok").write_bytes(b"abc")
    assert read_capped(tmp_path / "ok", 3, "thing") == b"abc"
    with pytest.raises(PrismError, match=r"thing .*ok is 3 bytes, over prismfl's limit of 2$"):
        read_capped(tmp_path / "ok", 2, "thing")
    with open(tmp_path / "sparse", "wb") as f:  # 1 TB on paper, nothing on disk: refused by its size, unread
        f.truncate(1 << 40)
    with pytest.raises(ConfigError, match="over prismfl's limit"):
        read_capped(tmp_path / "sparse", 1 << 20, "config file", ConfigError)
    with pytest.raises(PrismError, match="thing not found"):
        read_capped(tmp_path / "none", 10, "thing")
    with pytest.raises(ModelFileError, match="is a directory"):
        read_capped(tmp_path, 10, "model file", ModelFileError)
    with pytest.raises(PrismError, match="not a regular file"):
        read_capped("/dev/zero", 10, "thing")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(PrismError, read_capped, fifo, 10, "x")),
                              daemon=True)  # fmt: skip
    reader.start()
    reader.join(10)
    if reader.is_alive():  # a regression blocked on the pipe: a writer that closes at once releases it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
        pytest.fail("read_capped blocked on a pipe")
    assert "not a regular file" in str(outcome[0].value)


def test_model_files_are_capped_by_the_largest_network(tmp_path):
    from prismfl.model.generators import MAX_WEIGHTS

    assert modelfile.MAX_MODEL_BYTES == 12 + modelfile.MAX_HEADER_BYTES + MAX_WEIGHTS // 8 + 32
    path = tmp_path / "m.prism"
    with open(path, "wb") as f:
        f.truncate(modelfile.MAX_MODEL_BYTES + 1)
    with pytest.raises(ModelFileError, match="over prismfl's limit"):
        modelfile.load(path)
    path.write_bytes(forge_model(b" " * (modelfile.MAX_HEADER_BYTES + 1), b""))
    with pytest.raises(ModelFileError, match="header of 1,048,577 bytes is over"):
        modelfile.load(path)


def _no_generator(monkeypatch):
    """Make building a generator fail the test (model files are checked, and info shown, without one)."""
    from prismfl.model import generators

    def refuse(spec):
        raise AssertionError(f"a generator was built for {spec}")

    monkeypatch.setattr(generators, "build_generator", refuse)
    monkeypatch.setattr(modelfile, "build_generator", refuse)


def test_a_model_of_50m_weights_is_checked_and_shown_without_building_its_generator(tmp_path, run_cli, monkeypatch):
    from prismfl.model.generators import MAX_WEIGHTS, count_weights, layer_shapes

    spec = ArchSpec("mlp", 64, 4096, 1, 44, weight_seed=1)  # 49,676,288 weights in a 6.2 MB file
    n = count_weights(spec)
    assert MAX_WEIGHTS - 10**6 < n <= MAX_WEIGHTS
    layers = [[name, list(shape)] for name, shape in layer_shapes(spec)]
    header = {"format": "prismfl-model", "arch": spec.to_dict(), "num_weights": n, "layers": layers,
              "mask_coding": "packed-bits-le", "info": {"dataset": "forged"}}  # fmt: skip
    path = tmp_path / "big.prism"
    path.write_bytes(forge_model(json.dumps(header).encode(), b"\0" * ((n + 7) // 8)))
    _no_generator(monkeypatch)
    code, out, err = run_cli("info", str(path))
    assert code == 0, err
    assert f"{n:,}" in out and "forged" in out
    header["layers"][0][1][0] += 1  # a layer table this prismfl would not build: refused, still without building
    path.write_bytes(forge_model(json.dumps(header).encode(), b"\0" * ((n + 7) // 8)))
    one_line(*run_cli("info", str(path))[::2], "layer table does not match")


def test_a_dense_model_whose_weights_do_not_fit_is_refused_before_building(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    modelfile.save_dense(path, SPEC, torch.zeros(7), "fashion-mnist")
    _no_generator(monkeypatch)
    with pytest.raises(ModelFileError, match=r"weights of shape \(7,\)"):
        modelfile.load_dense(path)


def test_a_gzip_file_that_inflates_past_the_cap_is_a_data_error(tmp_path, monkeypatch):
    import gzip

    from prismfl.data import idx

    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\0" * (4 << 20)))  # 4 MB of zeros in 4 kB
    monkeypatch.setattr(idx, "MAX_DATA_FILE_BYTES", 1 << 20)
    with pytest.raises(DataError, match="decompresses to over prismfl's limit of 1,048,576"):
        idx.read_idx(path)


# ---------------------------------------------------------------- numbers on the command line

DEEP = "[" * 3000


@pytest.mark.parametrize(
    "args, needle",
    [
        (["sample", "m.prism", "--seed", str(2**64)], "--seed must be in 0..9,223,372,036,854,775,807"),
        (["sample", "m.prism", "--seed", "-1"], "--seed"),
        (["sample", "m.prism", "--seed", "1" + "0" * 5000], "--seed"),  # past Python's int() digit limit
        (["evaluate", "m.prism", "--seed", str(2**64)], "--seed"),
        (["evaluate", "m.prism", "--n", str(10**9)], "--n must be in 2..100,000"),
        (["privacy", "--epsilon", "1", "--images", "1" + "0" * 400], "got a number of 401 digits"),
        (["privacy", "--epsilon", "1", "--layers", str(10**9)], "--layers"),
        (["privacy", "--epsilon", "1", "--secagg", "-3"], "--secagg"),
        (["privacy", "--epsilon", "1", "--colluders", "2"], "--colluders must be in 0..0"),
        (["privacy", "--epsilon", "1", "--secagg", "4", "--colluders", "4"], "--colluders must be in 0..3"),
        (["privacy", "--epsilon", "1", "--audit", "-1"], "--audit"),
        (["privacy", "--epsilon", "nan"], "privacy.epsilon"),
        (["privacy", "--epsilon", "1", "--delta", "nan"], "privacy.delta"),
        (["grid", "--config", SMOKE, "--seeds", f"0,{2**64}"], "--seeds"),
        (["grid", "--config", SMOKE, "--samples", "0"], "--samples"),
        (["train", "--config", SMOKE, "--set", "seed=" + DEEP], "over prismfl's limit of 1,000"),
        (["train", "--config", SMOKE, "--set", "seed=" + "[" * 900], "nested too deeply"),
        (["train", "--config", SMOKE, "--set", "seed=" + "[" * 20 + "]" * 20], "nested more than 16 deep"),
        (["train", "--config", SMOKE, "--set", "train.lr=1" + "0" * 400], "train.lr must be a finite number"),
        (["train", "--no-such-flag"], "No such option"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_on_the_command_line_are_one_line(run_cli, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    one_line(*run_cli(*args, *(["--out", str(tmp_path / "out")] if args[0] in ("train", "grid") else []))[::2],
             needle)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even a run directory
