"""One hostile SuperNode of five must not stop a Flower run, nor change its model.

Each attack is a client mod on the in-process Grid of test_flower_apps.py that rewrites one node's
replies (well-framed messages with hostile content: what a modified ClientApp could send). The server
must drop that node with one log line and finish, with the very model of the run in which that node
never answered its setup message. Field checks of the replies themselves are in the unit tests below.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional extra prismfl[flower]")
from flwr.app import ConfigRecord

from conftest import needs_fmnist
from prismfl import modelfile, rundir
from prismfl.errors import PrismError
from prismfl.fl import wire
from prismfl.fl.methods.prism import Rules, apply_broadcast
from prismfl.flower import replies
from prismfl.flower.client_app import make_client_app
from prismfl.flower.payload import downlink_tag, to_array
from prismfl.flower.server_app import run_federation
from test_flower_apps import LocalGrid, _one_thread, _task_identity, flower_with_states, nodes_for, server  # noqa: F401

RUN = 'partition.num_clients=5 train.rounds=2 train.client_fraction=0.6 model.conditional=true model.arch="mlp-up" ' \
      'loss.features="public" train.warm_start=20'  # fmt: skip
NODE = {k: 104 - k for k in range(5)}  # nodes_for(5): partition k is node 104 - k


def deep(n: int = 3000) -> str:
    return "[" * n + "]" * n


SETUP_ATTACKS = {  # partition 2's setup reply, rewritten
    "partition id a string": lambda r: r.__setitem__("partition-id", "abc"),
    "no num-weights": lambda r: r.__delitem__("num-weights"),
    "deeply nested warm-start info": lambda r: r.__setitem__("warm-start-info", deep()),
    "deeply nested model info": lambda r: r.__setitem__("model-info", deep()),
    "class counts as strings": lambda r: r.__setitem__("statistics-class-counts", ["1"] * 10),
    "class counts of the wrong length": lambda r: r.__setitem__("class-counts", [5, 5, 5]),
    "a huge count": lambda r: r.__setitem__("class-counts", [2**62] * 10),
    "an integer key of 300 MB": lambda r: r.__setitem__("link-key", 300_000_000),
    "a partition beyond the run": lambda r: r.__setitem__("partition-id", 5),
}


class Hostile:
    """A client mod: `attack(record)` rewrites node `node`'s reply of message type `kind`."""

    def __init__(self, node: int, kind: str, attack):
        self.node, self.kind, self.attack = node, kind, attack

    def __call__(self, message, context, call_next):
        reply = call_next(message, context)
        if context.node_id == self.node and message.metadata.message_type == self.kind and not reply.has_error():
            self.attack(reply)
        return reply


def run(tmp_path, name: str, mods=(), silent=lambda node, group: False) -> tuple[list[dict], list[dict]]:
    out = tmp_path / name
    grid = LocalGrid(make_client_app(mods=mods), nodes_for(5), silent=silent)
    states = flower_with_states({"out-dir": str(out), "overrides": RUN, "reply-timeout": 2.0}, grid)
    return states, rundir.read_metrics(out)


@pytest.fixture(scope="module")
def without(tmp_path_factory):
    """The run whose partition-2 node never answers its setup message, and the one without partition 0's."""
    from flwr.supercore.task_identity import TaskIdentity

    tmp = tmp_path_factory.mktemp("without")
    with pytest.MonkeyPatch.context() as mp:  # (as _task_identity does for each test)
        for name in ("_task_id", "_run_id", "_node_id"):
            mp.setattr(TaskIdentity, name, 1)
        return {k: run(tmp, f"silent-{k}", silent=lambda node, group, k=k: node == NODE[k] and group == "setup")
                for k in (0, 2)}  # fmt: skip


def same_model(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[key], y[key]) for x, y in zip(a, b) for key in x)


FAST = ("partition id a string",)  # in make test; the others (and the unit tests below) in make test-slow


@needs_fmnist
@pytest.mark.parametrize("attack", [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in SETUP_ATTACKS])
def test_a_hostile_setup_reply_drops_the_node_and_the_run_finishes(attack, without, tmp_path):
    mod = Hostile(NODE[2], "query", lambda reply: SETUP_ATTACKS[attack](reply.content["prismfl"]))
    states, records = run(tmp_path, "hostile", mods=[mod])
    ref_states, ref_records = without[2]
    assert same_model(states, ref_states)
    assert [r["clients"] for r in records] == [r["clients"] for r in ref_records]
    lost = [f for r in records for f in r.get("failures", [])]
    assert lost and all(f["client"] == 2 and "dropped at set-up" in f["error"] for f in lost)


@needs_fmnist
def test_undecodable_warm_start_scores_drop_partition_0_and_the_run_goes_on_without_them(without, tmp_path):
    def forge(reply):
        data = bytearray(reply.content["warm-start"]["000"].data)
        data[-1] ^= 1
        reply.content["warm-start"]["000"] = to_array(bytes(data))

    states, _ = run(tmp_path, "warm", mods=[Hostile(NODE[0], "query", forge)])
    assert same_model(states, without[0][0])
    assert not same_model(states, without[2][0])  # (the warm start matters: this is not vacuous)


@needs_fmnist
def test_a_node_with_hostile_statistics_is_left_out_of_the_pooled_warm_start(tmp_path):
    """Without public images the server trains the warm start on the nodes' statistics: a node whose
    statistics are out of range is dropped at set-up, and the warm start is the other nodes' alone."""
    from prismfl import safestate
    from prismfl.flower.payload import STATE, from_array

    def forge(reply):
        tree = safestate.from_bytes(from_array(reply.content["statistics"]["000"], STATE), "statistics")
        tree["mean"][0] = tree["mean"][0] + 1e9
        reply.content["statistics"]["000"] = to_array(safestate.to_bytes(tree), STATE)

    pooled = RUN.replace('loss.features="public" ', "")
    out, grid = tmp_path / "pooled", LocalGrid(make_client_app(mods=[Hostile(NODE[2], "query", forge)]), nodes_for(5))
    states = flower_with_states({"out-dir": str(out), "overrides": pooled, "reply-timeout": 2.0}, grid)
    records = rundir.read_metrics(out)
    assert len(states) == 2 and all(f["client"] == 2 for r in records for f in r.get("failures", []))
    info = modelfile.load(out / "model.prism").info["warm_start"]
    assert info["source"] == "the clients' pooled statistics" and info["images"] == 4 * 600  # 4 nodes of 600 images


@needs_fmnist
def test_a_node_with_hostile_moments_is_dropped_before_set_up(tmp_path):
    """model.modes without public images: a node whose moment sums could not come from images in [0, 1] is
    dropped before set-up; the modes are the other nodes' and the run finishes without it."""
    from prismfl import safestate
    from prismfl.flower.payload import STATE, from_array

    def forge(reply):
        tree = safestate.from_bytes(from_array(reply.content["moments"]["000"], STATE), "moments")
        tree["sums"] = tree["sums"] * 1e6  # every pixel a million times white
        reply.content["moments"]["000"] = to_array(safestate.to_bytes(tree), STATE)

    modes = RUN.replace('loss.features="public" ', "") + " model.modes=2 loss.codes_per_step=8 train.batch_size=16"
    out = tmp_path / "modes"
    grid = LocalGrid(make_client_app(mods=[Hostile(NODE[2], "query.moments", forge)]), nodes_for(5))
    states = flower_with_states({"out-dir": str(out), "overrides": modes, "reply-timeout": 2.0}, grid)
    lost = [f for r in rundir.read_metrics(out) for f in r.get("failures", [])]
    assert len(states) == 2 and lost and all(f["client"] == 2 for f in lost)
    assert modelfile.load(out / "model.prism").spec.modes == 2


def test_moment_sums_and_modes_from_the_network_are_checked():
    from prismfl.data.modes import Modes, check_moments

    c, d = 2, 3
    good = {"counts": np.array([2.0, 1.0]), "sums": np.ones((c, d)), "outer": np.full((c, d, d), 0.5)}
    assert check_moments(good, c, d) is not None
    for key, value, match in [("counts", np.array([2.5, 1.0]), "whole numbers"),
                              ("counts", np.array([-1.0, 1.0]), "whole numbers"),
                              ("sums", np.full((c, d), 3.0), "add up to"),
                              ("outer", np.full((c, d, d), np.nan), "add up to"),
                              ("sums", np.ones((c, d + 1)), "shape"),
                              ("sums", np.ones((c, d), dtype=np.float32), "float64")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            check_moments({**good, key: value}, c, d)
    with pytest.raises(ValueError, match="a table"):
        check_moments({"counts": good["counts"]}, c, d)
    arrays = {"means": np.zeros((c, 4)), "bases": np.ones((c, 4, 1)), "centres": np.zeros((c, 3, 1)),
              "fitted": np.array([1.0, 0.0])}  # fmt: skip
    modes = Modes.from_arrays(arrays, 3, c, 4)
    assert modes.centres[1] is None and modes.centres[0].shape == (3, 1)
    for key, value in [("fitted", np.array([0.5, 0.0])), ("centres", np.zeros((c, 2, 1))),
                       ("means", np.full((c, 4), np.inf)), ("bases", np.ones((c, 4, 0)))]:  # fmt: skip
        with pytest.raises(ValueError):
            Modes.from_arrays({**arrays, key: value}, 3, c, 4)


@needs_fmnist
@pytest.mark.slow
def test_two_nodes_claiming_one_partition_are_both_dropped(tmp_path):
    from prismfl.flower import server_app

    mod = Hostile(NODE[2], "query", lambda reply: reply.content["prismfl"].__setitem__("partition-id", 1))
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server_app, "log", lines.append)
        _, records = run(tmp_path, "twice", mods=[mod])
    dropped = [line for line in lines if "dropped at set-up" in line and "all claim partition 1" in line]
    assert sorted(line.split()[1] for line in dropped) == sorted([str(NODE[1]), str(NODE[2])])
    lost = {f["client"] for r in records for f in r.get("failures", [])}
    assert lost <= {1, 2} and lost  # the rounds that chose them record them; the run finishes


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("metric", [float("nan"), math.inf, -1.0, "0.5"])
def test_a_round_reply_with_hostile_metrics_is_left_out(metric, tmp_path):
    def forge(reply):
        reply.content["metrics"]["train-seconds" if metric == -1.0 else "loss"] = metric

    if isinstance(metric, str):  # a MetricRecord holds numbers only: swap in a record that holds a string

        def forge(reply):  # noqa: F811
            reply.content["metrics"] = ConfigRecord({"loss": metric, "start-loss": 1.0, "train-seconds": 1.0})

    _, records = run(tmp_path, "metrics", mods=[Hostile(NODE[2], "train", forge)])
    bad = [f for r in records for f in r.get("failures", [])]
    assert bad and all(f["client"] == 2 and "reply rejected" in f["error"] for f in bad)
    assert all(math.isfinite(r["loss"]) for r in records)


@needs_fmnist
def test_a_train_message_altered_on_the_way_is_refused_by_the_client(tmp_path):
    """The replica checksum is under the server's tag: rewriting it (or a broadcast) in transit fails."""

    def alter(message, context, call_next):
        if context.node_id == NODE[2] and message.metadata.message_type == "train":
            message.content["prismfl"]["check-crc32"] = 12345
        return call_next(message, context)

    _, records = run(tmp_path, "altered", mods=[alter])
    bad = [f for r in records for f in r.get("failures", [])]
    assert bad and all(f["client"] == 2 and "does not carry the tag" in f["error"] for f in bad)


# ---- the checks themselves


def test_json_fields_are_bounded_before_parsing():
    assert replies.json_field('{"a": [1, [2]]}', "x") == {"a": [1, [2]]}
    assert replies.json_field('"[[[[[[[[[[[["', "x") == "[[[[[[[[[[[["  # brackets inside a string do not count
    with pytest.raises(replies.NodeError, match="nests deeper than 8"):
        replies.json_field(deep(9), "x")
    with pytest.raises(replies.NodeError, match="at most 65,536 characters"):
        replies.json_field(" " * 70_000, "x")
    with pytest.raises(replies.NodeError, match="not JSON"):
        replies.json_field("{", "x")
    with pytest.raises(replies.NodeError, match="must be a text"):
        replies.json_field(123, "x")


def test_numbers_and_bytes_are_typed_and_bounded():
    assert replies.integer(3, "p", 0, 4) == 3
    for bad in (True, 3.0, "3", 5, -1, None):
        with pytest.raises(replies.NodeError, match="p must be an integer in"):
            replies.integer(bad, "p", 0, 4)
    assert replies.number_list([1, 2.5], "c", {2}, 0, 10) == [1, 2.5]
    for bad in ([1], [1, math.nan], [1, 11], [1, "2"], "12", [1, True]):
        with pytest.raises(replies.NodeError):
            replies.number_list(bad, "c", {2}, 0, 10)
    with pytest.raises(replies.NodeError, match="an integer"):
        replies.number_list([1, 2.0], "c", {2}, 0, 10, integral=True)
    assert replies.raw_bytes(b"k" * 32, "key", 32) == b"k" * 32
    for bad in (300_000_000, b"k" * 31, "k" * 32):
        with pytest.raises(replies.NodeError, match="key must be 32 bytes"):
            replies.raw_bytes(bad, "key", 32)


def test_the_secure_aggregation_fields_of_a_setup_reply_are_checked():
    from flwr.app import RecordDict

    base = {"partition-id": 1, "num-weights": 10, "table-hash": f"{7:016x}", "class-counts": [], "source": "s",
            "model-info": '{"feature_net": {}, "privacy": null}', "link-key": b"k" * 32,
            "secagg-public-key": b"p" * 32, "secagg-share-key": b"q" * 32, "secagg-layout": "[[2], [2], [1]]",
            "secagg-clip": "[1.0]"}  # fmt: skip

    def parse(**change):
        content = RecordDict({"prismfl": ConfigRecord({**base, **change})})
        return replies.setup_reply(content, clients=3, num_weights=10, table_hash=7, num_classes=10, codes=1,
                                   secagg=True, key_bytes=32)  # fmt: skip

    assert parse().secagg == {"public_key": b"p" * 32, "share_key": b"q" * 32, "layout": [[2], [2], [1]],
                              "clip": [1.0]}  # fmt: skip
    for change, match in [({"secagg-public-key": 300_000_000}, "secagg-public-key must be 32 bytes"),
                          ({"secagg-share-key": b"q" * 31}, "secagg-share-key must be 32 bytes"),
                          ({"secagg-share-key": bytes(32)}, "share key is unusable"),
                          ({"secagg-layout": deep(3000)}, "nests deeper"),
                          ({"secagg-layout": "[[16384, 16384], [2], [1]]"}, "over the limit"),
                          ({"secagg-clip": "[-1]"}, "clip bounds"),
                          ({"table-hash": 7}, "another model")]:  # fmt: skip
        with pytest.raises(replies.NodeError, match=match):
            parse(**change)


def test_the_statistics_of_a_setup_reply_for_a_pooled_warm_start_are_checked():
    from flwr.app import ArrayRecord, RecordDict

    from prismfl.fl.client import statistics_message
    from prismfl.flower.payload import STATE
    from prismfl.loss.matching import FeatureStats

    base = {"partition-id": 1, "num-weights": 10, "table-hash": f"{7:016x}", "class-counts": [2, 1],
            "source": "s", "model-info": '{"feature_net": {}, "privacy": null}', "link-key": b"k" * 32,
            "statistics-class-counts": [2.0, 1.0]}  # fmt: skip
    honest = FeatureStats(
        [torch.ones(2, 3)], [torch.full((2, 3), 0.5)], 3, torch.tensor([2.0, 1.0], dtype=torch.float64)
    )

    def parse(tree=None, **change):
        blob = to_array(statistics_message(tree or honest), STATE)
        content = RecordDict({"prismfl": ConfigRecord({**base, **change}), "statistics": ArrayRecord({"000": blob})})
        return replies.setup_reply(content, clients=3, num_weights=10, table_hash=7, num_classes=2, codes=2,
                                   secagg=False, key_bytes=32)  # fmt: skip

    got = parse().statistics
    assert torch.equal(got.mean[0], honest.mean[0]) and got.count == 3
    bad = [(FeatureStats([torch.full((2, 3), 1e7)], honest.var, 3, honest.class_counts), "beyond"),
           (FeatureStats(honest.mean, [torch.full((2, 3), -1.0)], 3, honest.class_counts), "values below 0"),
           (FeatureStats(honest.mean, honest.var, 3, torch.tensor([1.0, 2.0], dtype=torch.float64)), "class counts"),
           (FeatureStats([torch.ones(3, 3)], [torch.ones(3, 3)], 3, torch.ones(3, dtype=torch.float64)), "statistics"),
           (FeatureStats([torch.ones(2, 3)], [torch.ones(2, 4)], 3, honest.class_counts), "statistics")]  # fmt: skip
    for tree, match in bad:
        with pytest.raises(replies.NodeError, match=match):
            parse(tree)


def test_round_metrics_are_finite_numbers_in_range():
    assert replies.train_metrics({"loss": 1.5, "start-loss": 2, "train-seconds": 0.0}) == (1.5, 2.0, 0.0)
    for key, bad in [("loss", math.nan), ("loss", math.inf), ("start-loss", "1"), ("train-seconds", -1.0),
                     ("loss", 1e13), ("loss", True), ("loss", [1.0])]:  # fmt: skip
        metrics = {"loss": 1.0, "start-loss": 1.0, "train-seconds": 1.0, key: bad}
        with pytest.raises(replies.NodeError, match=f"metrics {key} ="):
            replies.train_metrics(metrics)
    with pytest.raises(replies.NodeError, match="lack"):
        replies.train_metrics({"loss": 1.0})


def test_majority_takes_what_most_sent_and_the_lowest_partition_on_a_tie():
    assert replies.majority({0: [1], 1: [2], 2: [2]}) == [2]
    assert replies.majority({3: "b", 1: "a"}) == "a"


# ---- broadcasts against the run's rules (client side)


def delta_of(old: torch.Tensor, masks: list[torch.Tensor], *, m: int | None = None, lam=None, smoothing=0.01):
    from prismfl.fl import aggregate

    counts = aggregate.count_masks(masks)
    m = m or len(masks)
    return wire.encode_delta(counts, m, lam, smoothing, old, round_=1, table_hash=5)


def with_m(data: bytes, m: int) -> bytes:
    """A delta message with its m rewritten (the CRC made valid again: an attacker's message)."""
    import dataclasses

    msg = wire.parse(data, table_hash=5, num_weights=struct.unpack_from("<I", data, 24)[0])
    return dataclasses.replace(msg, payload=struct.pack("<H", m) + msg.payload[2:]).to_bytes()


def test_a_client_refuses_a_delta_its_run_could_not_have_sent():
    from prismfl.fl import aggregate
    from prismfl.seeds import generator_for

    old = torch.randn(500, generator=torch.Generator().manual_seed(0))
    masks = [torch.rand(500, generator=torch.Generator().manual_seed(s)) < 0.5 for s in (1, 2, 3)]
    rules = Rules(max_m=3, smoothing=0.01, mada=True, seed=0)
    proposal = aggregate.aggregate_scores(aggregate.count_masks(masks), 3, 0.01)
    lam = aggregate.mada_lambda(old, proposal, generator_for(0, "mada", 1))
    honest = apply_broadcast(old, delta_of(old, masks, lam=lam), round_=1, table_hash=5, rules=rules)
    assert torch.equal(honest, aggregate.blend(old, proposal, lam))
    forged = {
        "m = 65,535": (with_m(delta_of(old, masks, lam=1.0), 65535), "m = 65535 uploads; a round of this run has 1"),
        "m = 4": (with_m(delta_of(old, masks, lam=1.0), 4), "m = 4 uploads; a round of this run has 1 to 3"),
        "another smoothing": (delta_of(old, masks, lam=lam, smoothing=0.4999), "smoothing = 0.4999"),
        "another lambda": (delta_of(old, masks, lam=1.0), "lambda = 1.0; the state and the run seed give"),
        "no lambda in a MADA run": (delta_of(old, masks), "lambda = None"),
    }
    for data, match in forged.values():
        with pytest.raises(wire.UnexpectedMessage, match=match):
            apply_broadcast(old, data, round_=1, table_hash=5, rules=rules)
    with pytest.raises(wire.UnexpectedMessage, match="in a run without MADA"):
        apply_broadcast(old, delta_of(old, masks, lam=lam), round_=1, table_hash=5, rules=Rules(3, 0.01, False, 0))


def test_negative_zero_lambda_or_smoothing_is_not_canonical():
    import dataclasses

    old = torch.zeros(100)
    masks = [torch.ones(100, dtype=torch.bool)]
    msg = wire.parse(delta_of(old, masks, lam=0.0, smoothing=0.0), table_hash=5, num_weights=100)
    for sign_byte in (9, 17):  # the payload starts with m (u16), lambda (f64), smoothing (f64)
        payload = bytearray(msg.payload)
        payload[sign_byte] |= 0x80  # -0.0
        forged = dataclasses.replace(msg, payload=bytes(payload)).to_bytes()  # a valid CRC: an attacker's
        with pytest.raises(wire.UnexpectedMessage, match="outside"):
            wire.decode_delta(forged, old, round_=1, table_hash=5)
    # the encoder writes a -0.0 it is given as 0.0
    got = wire.decode_delta(delta_of(old, masks, lam=-0.0, smoothing=-0.0), old, round_=1, table_hash=5)
    assert struct.pack("<dd", got.lam, got.smoothing) == bytes(16)


def test_states_beyond_the_value_limit_are_refused():
    """(A sender encodes what it has, a diverged client's weights included; the receiver refuses them.)"""
    for value, ok in ((1e4, True), (-1e4, True), (10001.0, False), (3e38, False)):
        raw = wire.encode_state(torch.full((10,), value), round_=0, table_hash=5)
        if ok:
            assert wire.decode_state(raw, num_weights=10, table_hash=5)[1][0] == value
        else:
            with pytest.raises(wire.UnexpectedMessage, match="beyond"):
                wire.decode_state(raw, num_weights=10, table_hash=5)
    up = wire.Message(wire.KIND_STATE, wire.CODER_FLOAT32, 1, 3, 5, 10, torch.full((10,), 3.4e38).numpy().tobytes())
    with pytest.raises(wire.UnexpectedMessage, match="beyond"):
        wire.decode_state(up.to_bytes(), num_weights=10, table_hash=5, client=3)


def test_the_downlink_tag_covers_every_field():
    key, msgs = b"k" * 32, [b"abc", b"de"]
    tag = downlink_tag(key, 3, 10, 77, msgs)
    assert len(tag) == 32
    others = [downlink_tag(b"j" * 32, 3, 10, 77, msgs), downlink_tag(key, 4, 10, 77, msgs),
              downlink_tag(key, 3, 11, 77, msgs), downlink_tag(key, 3, 10, 78, msgs),
              downlink_tag(key, 3, 10, None, msgs), downlink_tag(key, 3, 10, 77, [b"abcd", b"e"]),
              downlink_tag(key, 3, 10, 77, [b"abc"])]  # fmt: skip
    assert tag not in others and len(set(others)) == len(others)


@needs_fmnist
def test_no_usable_node_stops_the_run_with_every_reason(tmp_path):
    grid = LocalGrid(make_client_app(mods=[Hostile(n, "query", lambda r: r.content["prismfl"].__delitem__("source"))
                                           for n in NODE.values()]), nodes_for(5))  # fmt: skip
    with pytest.raises(PrismError, match=r"0 of 5 SuperNodes set up their client.*lacks 'source'"):
        run_federation(grid, server({"out-dir": str(tmp_path / "x"), "overrides": RUN}))
    assert not (tmp_path / "x").exists()


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize(
    "attack",
    {
        "an integer public key": lambda r: r.__setitem__("secagg-public-key", 300_000_000),
        "a deeply nested layout": lambda r: r.__setitem__("secagg-layout", deep()),
        "another layout": lambda r: r.__setitem__("secagg-layout", "[[3], [3], [1]]"),
        "a small-order key": lambda r: r.__setitem__("secagg-public-key", bytes(32)),
    }.items(),
    ids=lambda a: a[0] if isinstance(a, tuple) else a,
)
def test_a_hostile_secure_aggregation_reply_stops_the_run_before_any_release(attack, tmp_path):
    """Each client's noise share assumes all clients add theirs: with one node dropped at set-up the
    secure sum would carry less noise than epsilon states, so the run stops, naming the node, before any
    vector is sent (a small-order key would otherwise break every other client's masking)."""
    name, change = attack
    overrides = ("partition.num_clients=5 train.rounds=1 privacy.epsilon=20 privacy.pool=1 privacy.secagg=true "
                 'privacy.pool_classes="all" model.conditional=true train.batch_size=40')  # fmt: skip
    grid = LocalGrid(make_client_app(mods=[Hostile(NODE[2], "query", lambda r: change(r.content["prismfl"]))]),
                     nodes_for(5))  # fmt: skip
    with pytest.raises(PrismError, match=f"secure aggregation needs every client: 1 SuperNode.*{NODE[2]}"):
        run_federation(grid, server({"out-dir": str(tmp_path / "secagg"), "overrides": overrides}))
    assert not any(m.metadata.message_type == "query.secagg" for m in grid.sent)


def test_a_delta_of_more_uploads_than_the_run_allows_is_refused_before_the_coder_runs(monkeypatch):
    """constriction's Binomial decoder can spin forever on hostile words when m is in the hundreds
    (fuzz: m = 900..977); m is checked against the run's round size and wire.MAX_DELTA_M first."""
    old = torch.zeros(300)
    honest = delta_of(old, [torch.ones(300, dtype=torch.bool)])
    monkeypatch.setattr(wire, "coder_call", lambda *_: pytest.fail("the coder ran"))
    for m, max_m in ((977, wire.MAX_DELTA_M), (wire.MAX_DELTA_M + 1, 10**6), (4, 3)):
        with pytest.raises(wire.UnexpectedMessage, match=f"m = {m} uploads"):
            wire.decode_delta(with_m(honest, m), old, round_=1, table_hash=5, max_m=max_m)
    with pytest.raises(ValueError, match="1 to 256 uploads"):
        wire.encode_delta(torch.zeros(300, dtype=torch.int32), 257, None, 0.01, old, round_=1, table_hash=5)


def test_a_round_of_more_clients_than_a_delta_holds_is_refused_by_the_config():
    from prismfl.config import RunConfig
    from prismfl.errors import ConfigError

    cfg = RunConfig()
    cfg.partition.num_clients, cfg.train.client_fraction = 1000, 0.3
    with pytest.raises(ConfigError, match="300 clients a round: a PRISM round aggregates at most 256 uploads"):
        cfg.validate()
    cfg.train.client_fraction = 0.25
    cfg.validate()
