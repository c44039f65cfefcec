"""`prismfl train --resume` trusts nothing it restores (issue 35): every field of a checkpoint's JSON
tree, edited alone in hostile ways, is refused with one line that names it, or, where the edit is
harmless, accepted; never a traceback, never a write to the run directory before the check passes."""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from conftest import needs_fmnist
from prismfl import rundir, safestate, schema
from prismfl.config import RunConfig, load_config
from prismfl.errors import PrismError
from prismfl.fl import simulate
from prismfl.fl.methods import registry

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
# the smoke run, smaller: 2 clients, 2 rounds of 1 step each, a narrow generator
SETS = ["partition.num_clients=2", "data.subset=600", "model.width=16", "model.z_dim=4", "train.rounds=2",
        "train.local_steps=1", "train.sample_every=0"]  # fmt: skip
pytestmark = needs_fmnist
DELETE = object()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, RunConfig]:
    out = tmp_path_factory.mktemp("resume") / "run"
    cfg = load_config(SMOKE, SETS)
    simulate.train(cfg, out, log=lambda *_: None)
    return out, cfg


@dataclass
class Restore:
    """What `engine.run` does with a checkpoint before its first round, set up once (the data, the feature
    net, the model), applied to a checkpoint's JSON tree: `rundir.check`'s checks (the configuration,
    transport, round, records and model info), the simulator's `restore` (InProcess.setup: the global state
    and every client's), the engine's resume branch (Method.check_state)."""

    out: Path
    cfg: RunConfig
    tree: dict  # the checkpoint's JSON tree as written
    tensors: dict
    method: object
    expect: schema.Expect

    def __call__(self, tree: dict) -> None:
        state = rundir.checked(safestate.decode_tree(tree, self.tensors, "checkpoint"))
        rundir.resumable(state, self.cfg, "simulator", self.out)
        expect = replace(self.expect, round=state["round"])
        simulate.restore(state, self.method, expect)
        self.method.check_state(state["server"], expect.num_weights, expect.table_hash, state["round"])


@pytest.fixture(scope="module")
def restore(trained) -> Restore:
    from safetensors.torch import load

    from prismfl.fl.client import client_context

    out, cfg = trained
    data = (out / rundir.CHECKPOINT).read_bytes()
    tree = json.loads(safestate.read_header(data, "checkpoint")["__metadata__"][safestate.META_KEY])
    method = registry.build(cfg)
    ctx = client_context(cfg, method.build_model, "cpu", log=lambda *_: None)
    return Restore(out, cfg, tree, load(data), method, simulate.expect_of(method, ctx, 1))


def fields(tree, path=()):
    """Every field of a JSON tree, depth first: (path, value), the path a tuple of keys and indices."""
    if path:
        yield path, tree
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from fields(value, (*path, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from fields(value, (*path, i))


def hostile(value) -> list[tuple[str, object]]:
    """The edits of one field: delete it, a value of the wrong type, -1, 10**9, 2**70, 1.5, a string;
    a list shortened and with an item duplicated. (Each name says what was done; DELETE removes the field.)"""
    edits = [("delete", DELETE), ("wrong type", [] if isinstance(value, dict) else {})]
    for name, new in [("-1", -1), ("10**9", 10**9), ("2**70", 2**70), ("1.5", 1.5), ("a string", "0")]:
        if not schema.json_equal(new, value):
            edits.append((name, new))
    if isinstance(value, list) and value:
        edits += [("shortened", value[:-1]), ("an item duplicated", [*value, value[0]])]
    return edits


def edited(tree: dict, path: tuple, new) -> dict:
    """`tree` with the field at `path` replaced by `new` (or deleted): copies along the path only."""
    root = dict(tree)
    node = root
    for key in path[:-1]:
        node[key] = dict(node[key]) if isinstance(node[key], dict) else list(node[key])
        node = node[key]
    if new is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = new
    return root


def dotted(path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


# edits accepted because they change nothing a resumed run does or states: (field, edit) patterns.
HARMLESS = [
    # a configuration key left out means its default, which these are (older checkpoints lack new keys)
    (r"config\..*", "delete"),
    # history in the round records: what metrics.jsonl and the report show, not checkable, never used to train
    (
        r"records\[\d+\]\.(loss|start_loss|upload_bytes|download_bytes|bits_per_param|entropy_bound_bits_per_param|"
        r"broadcast_bytes|seconds|client_seconds)",
        ".*",
    ),
    # the feature net's description: a resumed run states the one it loads (only its sha256 is compared)
    (r"model_info\.feature_net(\..*)?", ".*"),
    # a client's Adam learning rate (every round sets its own), and hyperparameters torch fills in with the
    # same defaults when they are absent
    (r"clients\.clients\[\d+\]\.state\.optimizer\.param_groups\[0\]\.lr", r"10\*\*9|2\*\*70|1\.5"),
    (
        r"clients\.clients\[\d+\]\.state\.optimizer\.param_groups\[0\]\.(amsgrad|maximize|foreach|capturable|"
        r"differentiable|fused|decoupled_weight_decay)",
        "delete",
    ),
    # no secure-aggregation field (older versions): none
    (r"clients\.clients\[\d+\]\.secagg", "delete"),
]


def memo_config(parse):
    """`parse` (rundir.checkpoint_config: the configuration's check, the slow part of a restore) run once
    per distinct configuration, its result or its refusal remembered."""
    configs: dict = {}

    def config_once(state: dict):
        key = json.dumps(state["config"], sort_keys=True, default=repr)
        if key not in configs:
            try:
                configs[key] = parse(state)
            except PrismError as exc:
                configs[key] = exc
        if isinstance(configs[key], PrismError):
            raise type(configs[key])(str(configs[key]))  # (a fresh one: no traceback chain grows over the cases)
        return configs[key]

    return config_once


def campaign(restore: Restore) -> dict:
    """Every field of the checkpoint, every edit of it: how many were tried, refused (one line, a
    PrismError), accepted; the accepted ones, and anything else (which must not happen)."""
    import re

    config_once = memo_config(rundir.checkpoint_config)
    restore(restore.tree)  # the checkpoint as written resumes
    out = {"tried": 0, "refused": 0, "accepted": [], "wrong": []}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rundir, "checkpoint_config", config_once)
        for path, value in fields(restore.tree):
            for name, new in hostile(value):
                out["tried"] += 1
                try:
                    restore(edited(restore.tree, path, new))
                except PrismError as exc:
                    out["refused"] += 1
                    if "\n" in str(exc) or not str(exc):
                        out["wrong"].append((dotted(path), name, f"not one line: {exc!r}"))
                    continue
                except Exception as exc:  # noqa: BLE001 - what the campaign looks for
                    out["wrong"].append((dotted(path), name, f"{type(exc).__name__}: {exc}"[:300]))
                    continue
                out["accepted"].append((dotted(path), name))
    out["wrongly accepted"] = [
        (f, e) for f, e in out["accepted"] if not any(re.fullmatch(p, f) and re.fullmatch(x, e) for p, x in HARMLESS)
    ]
    return out


def test_every_hostile_edit_of_every_field_is_refused_in_one_line_or_harmless(restore):
    result = campaign(restore)
    print(
        f"\ncheckpoint fields: {sum(1 for _ in fields(restore.tree))}; edits tried {result['tried']}, refused "
        f"{result['refused']}, accepted (harmless) {len(result['accepted'])}, tracebacks {len(result['wrong'])}"
    )
    assert result["wrong"] == []
    assert result["wrongly accepted"] == [], "\n".join(map(str, result["wrongly accepted"]))
    assert result["tried"] == result["refused"] + len(result["accepted"])


def refusal(restore: Restore, path: tuple, new) -> str:
    with pytest.raises(PrismError) as info:
        restore(edited(restore.tree, path, new))
    return str(info.value)


def test_the_campaigns_wrong_accepts_and_tracebacks_are_refused_naming_the_field(restore):
    tree = restore.tree
    client = ("clients", "clients", 0)
    vectors = tree["clients"]["clients"][0]["state"]["tracker"]["vectors"]
    cases = [
        ((*client, "state", "tracker", "vectors"), vectors[:-1], "clients.clients[0].state.tracker.vectors"),
        ((*client, "stats", "count"), -5, "clients.clients[0].stats.count"),
        ((*client, "k"), "0", "clients.clients[0].k"),
        ((*client, "k"), 7, "clients.clients[0].k"),
        ((*client, "k"), -1, "clients.clients[0].k"),
        ((*client, "k"), 1.5, "clients.clients[0].k"),
        ((*client, "k"), 1, "clients.clients[0].k"),  # the other client's id, twice
        ((*client, "held_round"), 10**9, "clients.clients[0].held_round"),
        (("server", "synced", 1), 7, "server.synced[1]"),
        (("server", "synced"), [0], "server.synced"),
        (("server", "table_hash"), -1, "server.table_hash"),
        (("server", "table_hash"), 2**70, "server.table_hash"),
        (("server", "deltas"), {"$int_keys": []}, "server.deltas"),
        (("records",), [1, 2], "records[0]"),
        ((*client, "state", "optimizer", "state"), {"$int_keys": []}, "clients.clients[0].state.optimizer.state"),
    ]
    for path, new, field in cases:
        line = refusal(restore, path, new)
        assert line.startswith(f"checkpoint field {field}: expected "), (path, new, line)
    # one client's id twice (a copied client state is refused before: its tensors are referenced twice)
    assert refusal(restore, ("clients", "clients", 1, "k"), 0).startswith("checkpoint field clients.clients[1].k: ")
    assert "bad tensor reference" in refusal(restore, ("clients", "clients"), [tree["clients"]["clients"][0]] * 2)


def test_a_hostile_checkpoint_is_one_line_and_exit_2_from_the_cli_and_nothing_is_written(trained, tmp_path, run_cli):
    import shutil

    out, cfg = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    data = (run / rundir.CHECKPOINT).read_bytes()
    state = safestate.from_bytes(data)
    state["clients"]["clients"][0]["stats"]["count"] = -5
    (run / rundir.CHECKPOINT).write_bytes(safestate.to_bytes(state))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    args = ["train", "--config", str(SMOKE), *(x for s in SETS for x in ("--set", s)), "--out", str(run), "--resume"]
    code, _, err = run_cli(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert lines[0].startswith("prismfl: error: checkpoint field clients.clients[0].stats.count: expected "), lines
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()} == before


def resumes(out: Path, cfg: RunConfig) -> None:
    """What `engine.run` does with the checkpoint in `out` before its first round raises nothing."""
    method = registry.build(cfg)
    ckpt = rundir.check(out, cfg, resume=True, transport="simulator")
    setup = simulate.InProcess(cfg).setup(method, ckpt, lambda *_: None)
    method.check_state(ckpt["server"], setup.num_weights, setup.table_hash, ckpt["round"])


# checkpoints of other settings, as they are written, are accepted: each state the schema describes differently
VARIANTS = {
    "private, Adam trackers, half the clients a round": ["privacy.epsilon=8", 'loss.tracker="adam"',
                                                         "train.client_fraction=0.5", "train.rounds=3"],
    "no trackers, no MADA, float32 broadcasts": ['loss.tracker="none"', "train.mada=false",
                                                 'train.broadcast="float32"'],
    "server momentum, replayed and refused uploads": ["partition.num_clients=3", "train.server_momentum=0.5",
                                                      "faults.byzantine=0.34", 'faults.attack="replay"',
                                                      'robust.rule="distance"'],
    "lost uploads": ["partition.num_clients=3", "faults.dropout=0.3", "train.rounds=3"],
    "means only, pooled releases": ["privacy.epsilon=8", 'loss.moment="mean"', "privacy.pool=0.5"],
    "conditional, classes drawn at every step": ["model.conditional=true", "train.batch_size=40",
                                                 "loss.codes_per_step=3"],
    "conditional, secure aggregation": ["model.conditional=true", "train.batch_size=40", "privacy.epsilon=20",
                                        "privacy.pool=1", "privacy.secagg=true", 'privacy.pool_classes="all"'],
    "warm start, quick FID every round": ["train.warm_start=100", "train.eval_every=1"],
    "fedavg": ['train.method="fedavg"'],
    "local": ['train.method="local"'],
    "central": ['train.method="central"', "partition.num_clients=3", "train.client_fraction=0.67"],
}  # fmt: skip
FAST = ("private, Adam trackers, half the clients a round",)


@pytest.mark.parametrize(
    "variant", [v if v in FAST else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS]
)  # fmt: skip
def test_checkpoints_of_other_settings_resume(variant, tmp_path):
    cfg = load_config(SMOKE, [*SETS, *VARIANTS[variant]])
    resumes(simulate.train(cfg, tmp_path / "run", log=lambda *_: None), cfg)


def test_schema_errors_name_the_field_on_one_line():
    node = schema.Table({"synced": schema.List(schema.Opt(schema.Int(0, 2)), 3)})
    with pytest.raises(safestate.StateError, match=r"^checkpoint field server\.synced\[2\]: expected an int in "
                       r"0\.\.2 or null, got 7$"):  # fmt: skip
        schema.check(node, {"synced": [0, None, 7]}, "checkpoint", "server")
    with pytest.raises(safestate.StateError, match=r"field x\.synced: expected a list of 3 items, got nothing"):
        schema.check(node, {}, "state", "x")
    for bad in (True, 1.0, "1", 2**70, math.nan):
        with pytest.raises(safestate.StateError):
            schema.check(schema.Int(0, 5), bad)
    with pytest.raises(safestate.StateError, match="got the string 'a\\\\nb'"):
        schema.check(schema.Int(), "a\nb")
