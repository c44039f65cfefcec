"""Hostile and broken inputs: every case is one clear line and exit code 2, never a traceback, never
an allocation the input asked for, never code run from a file."""

import dataclasses
import hashlib
import json
import math
import struct
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from conftest import needs_fmnist
from prismfl import config, configcheck, modelfile
from prismfl.config import RunConfig, load_config
from prismfl.configcheck import MAX_EPSILON
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


# ---- the config fuzz: what each input must do, worked out from the input alone

UNSPECIFIED = object()  # an input whose outcome the oracle leaves open: it loads, or a ConfigError


def toml_value(value) -> str:
    """`value` as a TOML value that reads back as exactly `value`: a bool as true/false, a str as a basic string
    with quotes, backslashes and control characters escaped, a number as Python writes it (inf, nan, 1e+16)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join(f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 32 or ord(c) == 127 else c
                             for c in value) + '"'  # fmt: skip
    return repr(value)


def declared_type(key: str) -> type:
    """The Python type (int, float, str or bool) a dotted config key's dataclass field declares."""
    *sections, name = key.split(".")
    node = RunConfig()
    for section in sections:
        node = getattr(node, section)
    field = next(f for f in dataclasses.fields(node) if f.name == name)
    return {"int": int, "float": float, "str": str, "bool": bool}[field.type]


def nesting(value) -> int:
    """How deep the deepest value inside a TOML table or array lies (its own items: 1)."""
    items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else []
    return max((1 + nesting(v) for v in items), default=0)


def config_file_outcome(data: bytes):
    """What load_config must do with a config file of these bytes: None (it loads, to the defaults), the part
    of its ConfigError's message that names the reason, or UNSPECIFIED. In order, as load_config checks:
    bytes that are not UTF-8: "not UTF-8"; text that tomllib (the TOML reference here) refuses: "not valid
    TOML"; tables nested deeper than config.MAX_DEPTH: "nested more than"; a config.RETIRED key holding
    another value than the kept one: "was retired". Then the table's entries in file order (retired keys at
    their kept value are dropped): a name that is no RunConfig field, at the top or in a section: "unknown
    config key"; a section that is not a table: "must be a table"; a known key at another value or type than
    its default: UNSPECIFIED from there on (whether it loads is the range tests' matter). A file of known keys
    at their defaults only (or none: empty, comments) loads, to RunConfig()."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return "is not valid TOML"
    if nesting(table) > config.MAX_DEPTH:
        return "nested more than"
    for key, kept in config.RETIRED.items():
        section, name = key.split(".")
        node = table.get(section)
        if isinstance(node, dict) and name in node and (node[name] != kept or type(node[name]) is not type(kept)):
            return "was retired"
    defaults = RunConfig()
    for name, value in table.items():
        if name not in {f.name for f in dataclasses.fields(defaults)}:
            return "unknown config key"
        default = getattr(defaults, name)
        if not dataclasses.is_dataclass(default):
            if value != default or type(value) is not type(default):
                return UNSPECIFIED
            continue
        if not isinstance(value, dict):
            return "must be a table"
        for sub, v in value.items():
            if f"{name}.{sub}" in config.RETIRED:
                continue  # at its kept value (else refused above): dropped before the table is read
            if sub not in {f.name for f in dataclasses.fields(default)}:
                return "unknown config key"
            if v != getattr(default, sub) or type(v) is not type(getattr(default, sub)):
                return UNSPECIFIED
    return None


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(getattr(RunConfig(), f.name))]


def _known_entries() -> list[tuple[str, str, object]]:
    """(section, name, default) of every config key ("" : the top level)."""
    out = [("", "seed", RunConfig().seed)]
    for section in _sections():
        node = getattr(RunConfig(), section)
        out += [(section, f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    return out


def _other(kept):
    return (not kept) if isinstance(kept, bool) else kept + 1 if isinstance(kept, int) else kept + "-other"


_NAMES = {name for _, name, _ in _known_entries()} | set(_sections()) | {k.split(".")[1] for k in config.RETIRED}
UNKNOWN_NAME = st.from_regex(r"[a-z_]{1,8}", fullmatch=True).filter(lambda n: n not in _NAMES)
UNKNOWN_VALUE = st.integers(-5, 5) | st.booleans() | st.text("ab", max_size=3)
CONFIG_ENTRY = st.one_of(
    st.sampled_from(_known_entries()),  # a known key at its default
    st.sampled_from(sorted(config.RETIRED.items())).flatmap(  # a retired key, at its kept value or another
        lambda kv: st.sampled_from([kv[1], _other(kv[1])]).map(lambda v: (*kv[0].split("."), v))
    ),
    st.tuples(st.sampled_from(["", *_sections()]) | UNKNOWN_NAME, UNKNOWN_NAME, UNKNOWN_VALUE),  # an unknown key
)


@st.composite
def config_documents(draw) -> bytes:
    """TOML text of known keys at their defaults, retired keys and unknown keys, the top-level keys first."""
    entries = draw(st.lists(CONFIG_ENTRY, max_size=6, unique_by=lambda e: e[:2]))
    lines = [f"{name} = {toml_value(v)}" for section, name, v in entries if not section]
    for section in dict.fromkeys(e[0] for e in entries if e[0]):
        lines += [f"[{section}]", *(f"{name} = {toml_value(v)}" for s, name, v in entries if s == section)]
    return "\n".join(lines).encode()


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=200).map(str.encode), st.binary(max_size=200), config_documents()))
def test_fuzz_config_files_load_or_are_refused_for_the_reason_their_bytes_give(tmp_path_factory, data):
    """Random text (mostly not TOML), random bytes (mostly not UTF-8) and TOML documents of known, retired
    and unknown keys: each loads or is refused as config_file_outcome (its docstring: the oracle) says."""
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_bytes(data)
    expected = config_file_outcome(data)
    event("unspecified" if expected is UNSPECIFIED else "loads" if expected is None else expected)
    if expected is UNSPECIFIED:
        try:
            load_config(path)
        except ConfigError:
            pass
    elif expected is None:
        assert load_config(path) == RunConfig(), data
    else:
        with pytest.raises(ConfigError) as refused:
            load_config(path)
        assert expected in str(refused.value), (data, expected, str(refused.value))


KEYS = ["seed", "train.lr", "train.batch_size", "model.z_dim", "model.width", "loss.feature_width", "train.rounds",
        "partition.num_clients", "faults.dropout", "privacy.epsilon", "train.mada", "faults.attack",
        "train.upload_coder", "train.lr_schedule"]  # fmt: skip
ANY_VALUE = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=5), st.booleans())
EPSILON_EXACT = MAX_EPSILON  # a finite epsilon above this is refused (configcheck), not generated here


def values_for(key: str):
    """Any value, or one the key's declaration makes likely to load: within its range (or on and just past
    its bounds, and partition.num_clients' 256 of set_outcome), one of its choices, a bool."""
    kind = declared_type(key)
    if key in configcheck.RANGES:
        low, high, _ = configcheck.RANGES[key]
        if kind is int:
            edges = [low - 1, low, high, high + 1] + ([256, 257] if key == "partition.num_clients" else [])
            return ANY_VALUE | st.integers(low, high) | st.sampled_from(edges)
        edges = [math.nextafter(b, d) for b in (low, high) for d in (-math.inf, math.inf)]
        return ANY_VALUE | st.floats(low, high) | st.sampled_from([float(low), float(high), *edges])
    return ANY_VALUE | (st.sampled_from(configcheck.choices()[key]) if kind is str else st.booleans())


def set_outcome(key: str, value) -> tuple[str, str | None]:
    """What load_config(smoke.toml, ["key=value"]) must do: ("loads", None), the key then holding the value,
    or (why, the start of its ConfigError's message). The value must have the key's declared type (an int for
    a float key is read as that float): else ("type", "<key> must be <type>"); lie in the key's configcheck.RANGES
    range (a NaN lies in none): else ("range", "<key> must be"); and be one of configcheck.choices() for a string
    key: else ("choice", "<key> = <value> is not one of"). smoke.toml's other keys add one cross-key rule for
    these keys: a PRISM round with the delta broadcast aggregates at most 256 uploads, and smoke.toml chooses
    every client each round, so more than 256 partition.num_clients is refused ("<n> clients a round").
    Nothing else refuses these keys there: the largest generator they ask for (model.z_dim or model.width
    4096 on smoke.toml's mlp) stays under the weight limit (the test below), and a finite privacy.epsilon
    above EPSILON_EXACT, where the accountant's numerics give up, is not generated."""
    kind = declared_type(key)
    if kind is float and type(value) is int:
        value = float(value)  # (the integers drawn stay far below 2**1000, where float() would overflow)
    if type(value) is not kind:
        return "type", f"{key} must be {kind.__name__}"
    if key in configcheck.RANGES:
        low, high, brackets = configcheck.RANGES[key]
        above = low < value if brackets[0] == "(" else low <= value
        below = value < high if brackets[1] == ")" else value <= high
        if not (above and below):
            return "range", f"{key} must be"
    if key in configcheck.choices() and value not in configcheck.choices()[key]:
        return "choice", f"{key} = {value!r} is not one of"
    if key == "partition.num_clients" and value > 256:
        return "256 uploads a round", f"{value} clients a round"
    return "loads", None


def test_the_largest_generator_the_value_fuzz_asks_for_stays_under_the_weight_limit():
    from prismfl.model.generators import MAX_WEIGHTS, count_weights

    spec = load_config(SMOKE).arch_spec()
    for name in ("z_dim", "width"):
        largest = dataclasses.replace(spec, **{name: configcheck.RANGES[f"model.{name}"][1]})
        assert count_weights(largest) <= MAX_WEIGHTS, largest


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(KEYS).flatmap(lambda key: st.tuples(st.just(key), values_for(key))))
@example(("partition.num_clients", 256))  # the cross-key rule's edge, every run
@example(("partition.num_clients", 257))
def test_fuzz_config_values_load_exactly_when_typed_in_range_and_allowed(key_value):
    """`--set key=value` on smoke.toml loads or is refused as set_outcome (its docstring: the oracle) says."""
    key, value = key_value
    assume(not (key == "privacy.epsilon" and type(value) in (int, float) and EPSILON_EXACT < value < math.inf))
    why, expected = set_outcome(key, value)
    event(why)
    item = f"{key}={toml_value(value)}"
    if expected is None:
        cfg = load_config(SMOKE, [item])
        section, _, name = key.rpartition(".")
        assert getattr(getattr(cfg, section) if section else cfg, name) == value, item
    else:
        with pytest.raises(ConfigError) as refused:
            load_config(SMOKE, [item])
        assert str(refused.value).startswith(expected), (item, expected, str(refused.value))


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
