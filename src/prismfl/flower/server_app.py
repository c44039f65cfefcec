"""The Flower ServerApp: a thin adapter that moves prismfl's messages between SuperNodes.

What a round computes (client choice, aggregation, MADA, the records) is prismfl's own code: the
method (fl.methods) and the one round loop (fl.engine). This module is the engine's transport: it
only sends and collects messages, with a timeout on every wait. The run directory is the same as
the in-process simulator's, and with the same seed and config so is every round, bit for bit.

Faults: a client whose reply is an error, does not come within the reply timeout, or does not
decode (a WireError) is left out of the round and listed under "failures" in that round's
metrics record; the round goes on if at least min-replies uploads are good, otherwise the run
stops with an error (after logging the round as "aborted"). A client that failed gets the full
global state the next time it is chosen, since the server no longer knows what its replica holds.
A run resumed (run config resume=true) starts every client afresh: their Adam and tracker state
was theirs, so the continued run is not bit-exact with one never interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from prismfl import safestate
from prismfl.data.sources import dataset_info
from prismfl.errors import PrismError
from prismfl.fl import engine, task
from prismfl.fl.client import class_table_of
from prismfl.fl.engine import Setup
from prismfl.fl.methods.base import Downlink, Upload
from prismfl.flower.payload import SECAGG, STATE, from_array, to_array, wire_record
from prismfl.flower.settings import ServerSettings, server_settings

log = logging.getLogger("flwr").info
POLL_SECONDS = 0.2


@dataclass
class Exchange:
    """Replies to one batch of messages, by destination node; nodes that never answered are absent."""

    replies: dict[int, Message]
    unsent: list[int]


def exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, timeout: float, group: str) -> Exchange:
    """Send one message per node and collect the replies until all came or `timeout` seconds passed."""
    nodes = list(contents)
    messages = [Message(contents[n], dst_node_id=n, message_type=message_type, ttl=timeout + 5, group_id=group)
                for n in nodes]  # fmt: skip
    ids = list(grid.push_messages(messages))
    pending = {mid: node for mid, node in zip(ids, nodes) if mid}
    unsent = [node for mid, node in zip(ids, nodes) if not mid]
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                replies[node] = reply
        if pending:
            time.sleep(POLL_SECONDS)
    return Exchange(replies, unsent)


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise PrismError(
                f"{len(nodes)} of the {count} SuperNodes this run needs (partition.num_clients) connected within "
                f"{timeout:g} s; start one flower-supernode per client or raise the run config 'connect-timeout'"
            )
        time.sleep(POLL_SECONDS)


def _error(reply: Message) -> str:
    return f"error {reply.error.code}: {reply.error.reason}"


def setup_clients(grid: Grid, s: ServerSettings, n: int, table_hash: int,
                  warm: bool = True) -> tuple[dict[int, int], list[dict], dict[int, dict]]:  # fmt: skip
    """Send the RunConfig to every node; return {partition id: node id}, the setup replies by partition
    (with `warm`, a new prism run's train.warm_start: partition 0's with its "warm-start" message) and the
    noisy sums the clients shared (privacy.pool; decoded, not yet checked)."""
    k = s.cfg.partition.num_clients
    nodes = wait_for_nodes(grid, k, s.connect_timeout)
    steps = s.cfg.train.warm_start if warm else 0
    request = RecordDict({"prismfl": ConfigRecord({"config": json.dumps(s.cfg.to_dict()), "warm-start": steps})})
    got = exchange(grid, {node: request for node in nodes}, MessageType.QUERY, s.reply_timeout, "setup")
    node_of: dict[int, int] = {}
    infos: dict[int, dict] = {}
    shared: dict[int, dict] = {}
    for node in nodes:
        reply = got.replies.get(node)
        if reply is None:
            raise PrismError(f"SuperNode {node} did not answer the setup message within {s.reply_timeout:g} s")
        if reply.has_error():
            raise PrismError(f"SuperNode {node} failed to set up its client: {_error(reply)}")
        info = dict(reply.content["prismfl"])
        pid = int(info["partition-id"])
        if pid in node_of:
            raise PrismError(f"SuperNodes {node_of[pid]} and {node} both have partition-id {pid}")
        if info["num-weights"] != n or info["table-hash"] != f"{table_hash:016x}":
            raise PrismError(f"SuperNode {node} built another model ({info['num-weights']} weights): "
                             "are server and clients running the same prismfl version?")  # fmt: skip
        node_of[pid], infos[pid] = node, info
        if "secagg-public-key" in info:
            try:
                layout, clip = json.loads(info["secagg-layout"]), json.loads(info["secagg-clip"])
                shared[pid] = {"public_key": bytes(info["secagg-public-key"]), "layout": layout, "clip": clip}
            except (KeyError, ValueError, TypeError) as exc:
                raise PrismError(f"SuperNode {node}'s secure-aggregation key: {type(exc).__name__}: {exc}") from None
        if pid == 0 and "warm-start" in reply.content:
            try:
                info["warm-start"] = from_array(reply.content["warm-start"]["000"])
            except (KeyError, ValueError, TypeError) as exc:
                raise PrismError(f"SuperNode {node}'s warm-start scores: {type(exc).__name__}: {exc}") from None
        if pid == 0 and "shrink-target" in reply.content:
            try:
                blob = from_array(reply.content["shrink-target"]["000"], STATE)
                info["shrink-target"] = safestate.from_bytes(blob, "shrinkage target")
            except (KeyError, ValueError, TypeError, safestate.StateError) as exc:
                raise PrismError(f"SuperNode {node}'s shrinkage target: {type(exc).__name__}: {exc}") from None
        if "shared" in reply.content:
            try:
                shared[pid] = safestate.from_bytes(from_array(reply.content["shared"]["000"], STATE), "shared sums")
            except (KeyError, ValueError, TypeError, safestate.StateError) as exc:
                raise PrismError(f"SuperNode {node}'s shared statistics: {type(exc).__name__}: {exc}") from None
    missing = sorted(set(range(k)) - set(node_of))
    if missing:
        raise PrismError(f"no SuperNode holds partition(s) {missing}")
    return node_of, [infos[i] for i in range(k)], shared


def class_counts(infos: list[dict]) -> list[float] | None:
    """The sum of the class counts the clients' statistics hold (conditional models), None otherwise."""
    reported = [list(info["statistics-class-counts"]) for info in infos if "statistics-class-counts" in info]
    if reported and len({len(r) for r in reported}) != 1:
        raise PrismError("the clients reported class counts of different lengths")
    return np.sum(reported, axis=0).tolist() if reported else None


def warm_info(info: dict) -> dict | None:
    """What partition 0's warm start reports (numbers only: a node's reply is not trusted to be well formed)."""
    try:
        got = json.loads(info.get("warm-start-info", "null"))
    except (TypeError, ValueError):
        return None
    if not isinstance(got, dict):
        return None
    keep = ("steps", "images", "loss", "seconds")
    return {key: v for key, v in got.items() if key in keep and type(v) in (int, float)}


class GridTransport:
    """The engine's transport over a Flower Grid: one message per chosen client and round, its upload
    back. What a round computes is the method's (fl.methods) and the loop is the engine's."""

    name = "flower"

    def __init__(self, grid: Grid, settings: ServerSettings):
        self.grid, self.s = grid, settings
        self.min_replies = settings.min_replies
        self.node_of: dict[int, int] = {}

    def setup(self, method, checkpoint: dict | None, log_) -> Setup:
        cfg = self.s.cfg
        if checkpoint is not None and not method.communicates:
            raise PrismError(f"a {cfg.train.method} run on Flower cannot be resumed: each client's own scores "
                             "lived in its SuperNode; start a new run")  # fmt: skip
        if checkpoint is not None and not math.isinf(cfg.privacy.epsilon):
            raise PrismError("resuming a private Flower run would make every client release its statistics again "
                             "(spending epsilon twice); start a new run")  # fmt: skip
        n, table_hash = task.model_layout(method.build_model())
        self.node_of, infos, shared = setup_clients(
            self.grid, self.s, n, table_hash, warm=checkpoint is None and method.warm_starts
        )
        first = json.loads(infos[0]["model-info"])  # partition 0 holds data for every method
        privacy = first["privacy"] and {key: v for key, v in first["privacy"].items() if key != "clip"}
        table, names = class_table_of([list(info["class-counts"]) for info in infos],
                                      list(dataset_info(cfg.data.dataset).class_names))  # fmt: skip
        return Setup(
            num_weights=n,
            table_hash=table_hash,
            class_table=table,
            class_counts=class_counts(infos),
            class_names=names,
            source=infos[0]["source"],
            feature_meta=first["feature_net"],
            privacy=privacy,
            shared=shared or None,
            warm_start=infos[0].get("warm-start"),
            warm_info=warm_info(infos[0]),
            shrink_target=infos[0].get("shrink-target"),
        )

    def secagg_masked(self, keys: dict[int, bytes], context: bytes) -> dict[int, bytes]:
        request = RecordDict({"prismfl": ConfigRecord({"peers": list(keys), "keys": list(keys.values()),
                                                       "context": context})})  # fmt: skip
        got = exchange(self.grid, {self.node_of[k]: request for k in keys}, f"{MessageType.QUERY}.secagg",
                       self.s.reply_timeout, "secagg")  # fmt: skip
        masked = {}
        for k in keys:
            reply = got.replies.get(self.node_of[k])
            if reply is not None and not reply.has_error():
                try:
                    masked[k] = from_array(reply.content["masked"]["000"], SECAGG)
                except (KeyError, ValueError, TypeError):
                    pass  # a missing vector: the engine stops with the list of clients it lacks
        return masked

    def share_pool(self, pooled) -> None:
        data = to_array(safestate.to_bytes(pooled.to_tree()), STATE)
        request = RecordDict({"pooled": ArrayRecord({"000": data})})
        got = exchange(self.grid, dict.fromkeys(self.node_of.values(), request), f"{MessageType.QUERY}.pool",
                       self.s.reply_timeout, "pool")  # fmt: skip
        for k, node in self.node_of.items():
            reply = got.replies.get(node)
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else _error(reply)
                raise PrismError(f"client {k} (SuperNode {node}) did not take the pooled statistics: {why}")

    def exchange(self, rnd: int, downlinks: dict[int, Downlink]) -> tuple[dict[int, Upload], list[dict]]:
        contents = {}
        for k, down in downlinks.items():
            request = {"round": rnd, "steps": down.steps}
            if down.check is not None:
                request["check-crc32"] = down.check
            content = RecordDict({"prismfl": ConfigRecord(request)})
            if down.messages:
                content["broadcast"] = wire_record(down.messages)
            contents[self.node_of[k]] = content
        got = exchange(self.grid, contents, MessageType.TRAIN, self.s.reply_timeout, f"round-{rnd}")
        replies, failures = {}, []
        for k in sorted(downlinks):
            node = self.node_of[k]
            reply = got.replies.get(node)
            if reply is None:
                why = "message not accepted by the SuperLink" if node in got.unsent \
                    else f"no reply within {self.s.reply_timeout:g} s"  # fmt: skip
            elif reply.has_error():
                why = _error(reply)
            else:
                try:
                    m = reply.content["metrics"]
                    replies[k] = Upload(from_array(reply.content["upload"]["000"]), float(m["loss"]),
                                        float(m["start-loss"]), float(m["train-seconds"]))  # fmt: skip
                    continue
                except (KeyError, ValueError, TypeError) as exc:
                    why = f"reply rejected: {type(exc).__name__}: {exc}"
            failures.append({"client": k, "node": str(node), "error": why})
        return replies, failures

    def client_states(self) -> None:
        return None  # each client keeps its own state in its SuperNode


def run_federation(grid: Grid, s: ServerSettings, on_round=None) -> Path:
    """Run (or, with run config resume=true, continue) the rounds of `s.cfg` over the SuperNodes of
    `grid` and write the run directory `s.out`."""
    return engine.run(s.cfg, s.out, GridTransport(grid, s), resume=s.resume, log=log, on_round=on_round)


def make_server_app(run_config: dict | None = None, on_round=None) -> ServerApp:
    """The ServerApp. `run_config` fills keys Flower's run config lacks (the run_simulation API passes
    none); `on_round(round, scores)` is called after every round (tests compare the scores)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = server_settings({**(run_config or {}), **dict(context.run_config)})
        run_federation(grid, settings, on_round)

    return app


app = make_server_app()
