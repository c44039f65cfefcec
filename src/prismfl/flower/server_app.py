"""The Flower ServerApp: a thin adapter that moves prismfl's messages between SuperNodes.

What a round computes (client choice, aggregation, MADA, the records) is prismfl's own code: the
method (fl.methods) and the one round loop (fl.engine). This module is the engine's transport: it
only sends and collects messages (flower/messaging.py), with a timeout on every wait. The run directory is the same as
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
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from prismfl import safestate
from prismfl.data.sources import dataset_info
from prismfl.device import resolve_device
from prismfl.errors import PrismError
from prismfl.fl import engine, wire
from prismfl.fl.client import class_table_of, federation_modes, modes_message
from prismfl.fl.engine import Setup
from prismfl.fl.methods.base import Downlink, Upload
from prismfl.flower import replies
from prismfl.flower.messaging import claimed_replies, exchange, reply_error, wait_for_nodes
from prismfl.flower.payload import SECAGG, STATE, WIRE, downlink_tag, to_array, wire_record
from prismfl.flower.settings import ServerSettings, server_settings

log = logging.getLogger("flwr").info


def needs_modes(cfg) -> bool:
    """model.modes without public images: the modes come from the nodes' moment sums (data/modes.py)."""
    return cfg.model.modes > 1 and not cfg.public_images()


def gather_modes(grid: Grid, s: ServerSettings, nodes: list[int]) -> tuple[bytes, dict[int, int], dict[str, str], dict]:
    """Ask every node for its moment sums, add up those of the nodes that answered well (in partition order,
    as the simulator does) and fit the modes (principal_modes). Returns the modes as a state blob for the
    setup message, {node: partition} of the nodes kept, {node: why} of those dropped (as at set-up), and
    the bytes of the kept nodes' sums and of the modes sent back ({"up", "down"})."""
    from prismfl.data.modes import MODE_POOL

    cfg = s.cfg
    info = dataset_info(cfg.data.dataset)
    num_classes, shape = len(info.class_names), (info.channels, info.size, info.size)
    d = info.channels * (info.size // MODE_POOL) ** 2
    request = RecordDict({"prismfl": ConfigRecord({"config": json.dumps(cfg.to_dict())})})
    got = exchange(grid, {node: request for node in nodes}, f"{MessageType.QUERY}.moments", s.reply_timeout,
                   "moments")  # fmt: skip

    sizes: dict[int, int] = {}

    def parse(node: int, reply: Message) -> tuple[int, dict]:
        pid, sums, sizes[node] = replies.moments_reply(reply.content, clients=cfg.partition.num_clients,
                                                       num_classes=num_classes, d=d,
                                                       private=not math.isinf(cfg.privacy.epsilon))  # fmt: skip
        return pid, sums

    kept, dropped = claimed_replies(got, nodes, s.reply_timeout, "moments message", "compute its moment sums", parse)
    if not kept:
        raise PrismError("no SuperNode sent usable moment sums for the modes: " + "; ".join(
            f"SuperNode {node}: {why}" for node, why in dropped.items()))  # fmt: skip
    modes = federation_modes(cfg, [kept[pid][1] for pid in sorted(kept)], shape)
    blob = modes_message(modes)
    traffic = {"up": sum(sizes[node] for node, _ in kept.values()), "down": len(blob) * len(kept)}
    return blob, {node: pid for pid, (node, _) in kept.items()}, dropped, traffic


def setup_clients(
    grid: Grid, s: ServerSettings, method, n: int, table_hash: int, warm: bool = True
) -> tuple[dict[int, int], dict[int, replies.SetupReply], dict[str, str], dict]:
    """Send the RunConfig to every node; return {partition id: node id} and the checked setup replies
    of the nodes kept, by partition (with `warm`, a new prism run's train.warm_start: partition 0's
    carries its scores), {node: why} for the nodes dropped, and the set-up's payload bytes ({"up", "down"}:
    the moment sums and statistics the nodes sent, the modes sent back).

    A node is dropped, with one log line, when it does not answer, answers with an error, or sends a
    reply that is not what an honest node of this run sends (replies.setup_reply); when two nodes
    claim one partition (neither can be told from the other); and when its secure-aggregation layout
    or its shared statistics' shapes differ from what most nodes sent. Its partition then takes no
    part in the run: a round that chooses it lists it under failures. The run stops only when fewer
    than min-replies nodes are left."""
    from prismfl import privacy, secagg

    cfg = s.cfg
    private = not math.isinf(cfg.privacy.epsilon)
    k = cfg.partition.num_clients
    nodes = wait_for_nodes(grid, k, s.connect_timeout)
    dropped: dict[str, str] = {}
    partition_of: dict[int, int] = {}
    traffic = {"up": 0, "down": 0}  # what the modes' exchange and the statistics carry (payload bytes)
    if needs_modes(cfg):  # one exchange before set-up: the modes the clients' statistics are per
        modes, partition_of, dropped, traffic = gather_modes(grid, s, nodes)
        nodes = [node for node in nodes if node in partition_of]
    pooled = warm and pooled_warm_start(cfg, method)  # the server trains it on the sum of the clients' statistics
    steps = cfg.train.warm_start if warm and not pooled else 0  # partition 0 trains it on the public hold-out
    request = RecordDict({"prismfl": ConfigRecord({"config": json.dumps(cfg.to_dict()), "warm-start": steps,
                                                   "send-statistics": int(pooled)})})  # fmt: skip
    if partition_of:
        request["modes"] = ArrayRecord({"000": to_array(modes, STATE)})
    got = exchange(grid, {node: request for node in nodes}, MessageType.QUERY, s.reply_timeout, "setup")
    num_classes = len(dataset_info(cfg.data.dataset).class_names)

    def parse(node: int, reply: Message) -> tuple[int, replies.SetupReply]:
        checked = replies.setup_reply(reply.content, clients=k, num_weights=n, table_hash=table_hash,
                                      num_classes=num_classes, codes=method.spec.codes, secagg=cfg.privacy.secagg,
                                      key_bytes=secagg.KEY_BYTES, private=private,
                                      privacy_schema=privacy.summary_schema(cfg))  # fmt: skip
        if checked.shared is not None:
            privacy.check_shared(checked.shared, None, method.spec.codes if method.spec.num_classes else 0)
        if checked.partition == 0 and steps and checked.warm_start is None:
            raise replies.NodeError("partition 0 sent no warm-start scores in a warm-started run")
        if pooled and checked.statistics is None:
            raise replies.NodeError("it sent no statistics for the pooled warm start")
        if partition_of and checked.partition != partition_of[node]:
            raise replies.NodeError(f"it sent the moments of partition {partition_of[node]} and now claims "
                                    f"partition {checked.partition}")  # fmt: skip
        return checked.partition, checked

    kept, refused = claimed_replies(got, nodes, s.reply_timeout, "setup message", "set up its client", parse)
    dropped.update(refused)
    infos = {pid: checked for pid, (_, checked) in kept.items()}
    node_of = {pid: node for pid, (node, _) in kept.items()}
    traffic["up"] += sum(r.statistics_bytes for r in infos.values())
    consensus = (  # what every honest node sends alike (an empty signature: nothing to compare)
        ("class-count rows' width", lambda r: len(r.class_counts)),
        ("secure-aggregation layout and clip bounds", lambda r: r.secagg and [r.secagg["layout"], r.secagg["clip"]]),
        ("shared statistics' shapes", lambda r: r.shared and ["shapes", *(list(t.shape) for t in (
            *r.shared["sums"], *r.shared["squares"]))]),
        ("statistics' shapes", lambda r: r.statistics and ["shapes", *(list(t.shape) for t in r.statistics.mean)]),
    )  # fmt: skip
    for what, signature in consensus:
        signatures = {pid: sig for pid, r in infos.items() if (sig := signature(r))}
        agreed = replies.majority(signatures) if signatures else None
        for pid in [pid for pid, sig in signatures.items() if sig != agreed]:
            dropped[str(node_of.pop(pid))] = f"its {what} differ from those most nodes sent"
            del infos[pid]
    for node, why in dropped.items():
        log(f"SuperNode {node} dropped at set-up: {why}")
    need = secagg.min_survivors(k, cfg.privacy.dropouts)  # each client's noise share assumes that many add theirs
    if cfg.privacy.secagg and len(node_of) < need:
        who = "every client" if need == k else f"{need} of the {k} clients (privacy.dropouts)"
        raise PrismError(f"secure aggregation needs {who}: {len(dropped)} SuperNode(s) dropped at set-up, "
                         "so the secure sum would carry less noise than privacy.epsilon states; "
                         + "; ".join(f"SuperNode {node}: {why}" for node, why in dropped.items()))  # fmt: skip
    if not node_of or len(node_of) < min(s.min_replies, k):
        reasons = "; ".join(f"SuperNode {node}: {why}" for node, why in dropped.items())
        raise PrismError(f"{len(node_of)} of {k} SuperNodes set up their client, fewer than min-replies = "
                         f"{s.min_replies}: {reasons}")  # fmt: skip
    return node_of, infos, dropped, traffic


def pooled_warm_start(cfg, method) -> bool:
    """train.warm_start without public images, for a method that warm-starts: trained at the server on the
    clients' pooled statistics (as the simulator does), which each node sends in its setup reply."""
    return bool(cfg.train.warm_start) and method.warm_starts and not cfg.public_images()


def server_warm_start(cfg, method, infos: dict[int, replies.SetupReply]) -> tuple[bytes, dict]:
    """The pooled warm start, trained here: the union statistics of the kept nodes (in partition order,
    as the simulator sums them), a data-less context (the loss's random feature net comes from the seed)."""
    from prismfl.fl.client import training_context, warm_start
    from prismfl.loss.matching import combine_stats

    info = dataset_info(cfg.data.dataset)
    recipe = {"kind": "random", "channels": info.channels, "classes": len(info.class_names)}
    ctx = training_context(cfg, method.build_model, resolve_device(cfg.train.device), recipe)
    pooled = combine_stats([infos[pid].statistics for pid in sorted(infos)])
    return warm_start(ctx, cfg.train.warm_start, pooled)


def warm_start_decodes(message: bytes, n: int, table_hash: int) -> bool:
    """Partition 0's warm-start scores are a state message of round 0 for this model."""
    from prismfl.fl import wire

    try:
        return wire.decode_state(message, num_weights=n, table_hash=table_hash)[0] == 0
    except wire.WireError:
        return False


def class_counts(infos: list[replies.SetupReply]) -> list[float] | None:
    """The sum of the class counts the clients' statistics hold (conditional models), None otherwise
    (each list's length was checked against the model's codes)."""
    reported = [r.statistics_class_counts for r in infos if r.statistics_class_counts is not None]
    return np.sum(reported, axis=0).tolist() if reported else None


class GridTransport:
    """The engine's transport over a Flower Grid: one message per chosen client and round, its upload
    back. What a round computes is the method's (fl.methods) and the loop is the engine's."""

    name = "flower"

    def __init__(self, grid: Grid, settings: ServerSettings):
        self.grid, self.s = grid, settings
        self.min_replies = settings.min_replies
        self.node_of: dict[int, int] = {}  # the partitions kept at set-up -> their SuperNode
        self.absent: set[int] = set()  # partitions whose node was dropped at set-up
        self.link_keys: dict[int, bytes] = {}  # each kept partition's key for its train messages' tags

    def setup(self, method, checkpoint: dict | None, log_) -> Setup:
        cfg = self.s.cfg
        if checkpoint is not None and not method.communicates:
            raise PrismError(f"a {cfg.train.method} run on Flower cannot be resumed: each client's own scores "
                             "lived in its SuperNode; start a new run")  # fmt: skip
        if checkpoint is not None and not math.isinf(cfg.privacy.epsilon):
            raise PrismError("resuming a private Flower run would make every client release its statistics again "
                             "(spending epsilon twice); start a new run")  # fmt: skip
        n, table_hash = wire.model_layout(method.build_model())
        self.node_of, infos, _, traffic = setup_clients(self.grid, self.s, method, n, table_hash,
                                               warm=checkpoint is None and method.warm_starts)  # fmt: skip
        zero = infos.get(0)
        if zero is not None and zero.warm_start is not None and not warm_start_decodes(zero.warm_start, n, table_hash):
            log(f"SuperNode {self.node_of.pop(0)} dropped at set-up: its warm-start scores do not decode")
            del infos[0]
            zero = None
            if not infos or len(infos) < min(self.s.min_replies, cfg.partition.num_clients):
                raise PrismError(f"{len(infos)} SuperNodes left after set-up, fewer than min-replies = "
                                 f"{self.s.min_replies}")  # fmt: skip
        warm, warm_info = (zero.warm_start, zero.warm_info) if zero is not None else (None, None)
        if checkpoint is None and pooled_warm_start(cfg, method):
            warm, warm_info = server_warm_start(cfg, method, infos)
        k = cfg.partition.num_clients
        self.absent = {pid for pid in range(k) if pid not in infos}
        self.link_keys = {pid: r.link_key for pid, r in infos.items()}
        first = infos[min(infos)]  # the lowest partition kept: its feature net and privacy parameters
        privacy = first.model_info["privacy"]
        privacy = privacy and {key: v for key, v in privacy.items() if key != "clip"}
        rows = [infos[pid].class_counts if pid in infos else [] for pid in range(k)]
        own_counts = {pid: r.statistics_class_counts for pid, r in infos.items() if r.statistics_class_counts}
        table, names = class_table_of(rows, list(dataset_info(cfg.data.dataset).class_names))
        shared = {pid: r.secagg if r.secagg is not None else r.shared for pid, r in infos.items()
                  if r.secagg is not None or r.shared is not None}  # fmt: skip
        return Setup(
            num_weights=n,
            table_hash=table_hash,
            class_table=table,
            class_counts=class_counts([infos[pid] for pid in sorted(infos)]),
            client_counts=own_counts or None,
            class_names=names,
            source=first.source,
            feature_meta=first.model_info["feature_net"],
            privacy=privacy,
            shared=shared or None,
            warm_start=warm,
            warm_info=warm_info,
            shrink_target=zero and zero.shrink_target,
            absent=sorted(self.absent),
            setup_traffic=traffic,
        )

    def secagg_exchange(self, stage: str, requests: dict[int, dict]) -> tuple[dict[int, dict], dict[int, str]]:
        """One stage of the secure sum: a "query.secagg" message per client with its request's fields (and
        the stage) in a config record; the reply's fields back, the masked vector from an array record.
        What the fields hold is secagg.SecAggServer.take's to check."""
        contents = {self.node_of[k]: RecordDict({"prismfl": ConfigRecord({**request, "stage": stage})})
                    for k, request in requests.items() if k in self.node_of}  # fmt: skip
        got = exchange(self.grid, contents, f"{MessageType.QUERY}.secagg", self.s.reply_timeout, f"secagg-{stage}")
        answers, failures = {}, {}
        for k in requests:
            reply = got.replies.get(self.node_of.get(k))
            if reply is None:
                failures[k] = f"no reply within {self.s.reply_timeout:g} s"
            elif reply.has_error():
                failures[k] = reply_error(reply)
            else:
                try:
                    fields = dict(reply.content["prismfl"])
                    if stage == "masked":
                        fields["masked"] = replies.payload(reply.content, "masked", SECAGG, "masked vector")
                    answers[k] = fields
                except (KeyError, TypeError, ValueError, replies.NodeError) as exc:
                    failures[k] = f"reply rejected: {type(exc).__name__}: {exc}"
        return answers, failures

    def share_pool(self, pooled) -> None:
        data = to_array(safestate.to_bytes(pooled.to_tree()), STATE)
        request = RecordDict({"pooled": ArrayRecord({"000": data})})
        got = exchange(self.grid, dict.fromkeys(self.node_of.values(), request), f"{MessageType.QUERY}.pool",
                       self.s.reply_timeout, "pool")  # fmt: skip
        lost = []
        for k, node in list(self.node_of.items()):
            reply = got.replies.get(node)
            if reply is None or reply.has_error():  # it cannot train against the pooled targets: drop it
                why = "no reply" if reply is None else reply_error(reply)
                lost.append(f"client {k} (SuperNode {node}) did not take the pooled statistics: {why}")
                log(f"{lost[-1]}; dropped")
                del self.node_of[k]
                self.absent.add(k)
        if not self.node_of or len(self.node_of) < min(self.min_replies, self.s.cfg.partition.num_clients):
            raise PrismError(f"{len(self.node_of)} clients left, fewer than min-replies = {self.min_replies}: "
                             f"{'; '.join(lost)}")  # fmt: skip

    def exchange(self, rnd: int, downlinks: dict[int, Downlink]) -> tuple[dict[int, Upload], list[dict]]:
        contents, failures = {}, []
        for k in sorted(set(downlinks) & self.absent):
            failures.append({"client": k, "error": "its SuperNode was dropped at set-up"})
        for k, down in downlinks.items():
            if k in self.absent:
                continue
            request = {"round": rnd, "steps": down.steps,
                       "auth": downlink_tag(self.link_keys[k], rnd, down.steps, down.check, down.messages)}  # fmt: skip
            if down.check is not None:
                request["check-crc32"] = down.check
            content = RecordDict({"prismfl": ConfigRecord(request)})
            if down.messages:
                content["broadcast"] = wire_record(down.messages)
            contents[self.node_of[k]] = content
        got = exchange(self.grid, contents, MessageType.TRAIN, self.s.reply_timeout, f"round-{rnd}")
        uploads = {}
        for k in sorted(set(downlinks) - self.absent):
            node = self.node_of[k]
            reply = got.replies.get(node)
            if reply is None:
                why = "message not accepted by the SuperLink" if node in got.unsent \
                    else f"no reply within {self.s.reply_timeout:g} s"  # fmt: skip
            elif reply.has_error():
                why = reply_error(reply)
            else:
                try:
                    data = replies.payload(reply.content, "upload", WIRE, "upload")
                    uploads[k] = Upload(data, *replies.train_metrics(reply.content["metrics"]))
                    continue
                except (KeyError, TypeError, replies.NodeError) as exc:
                    why = f"reply rejected: {type(exc).__name__}: {exc}"
            failures.append({"client": k, "node": str(node), "error": why})
        return uploads, sorted(failures, key=lambda f: f["client"])

    def client_states(self) -> None:
        return None  # each client keeps its own state in its SuperNode


def run_federation(grid: Grid, s: ServerSettings, on_round=None) -> Path:
    """Run (or, with run config resume=true, continue) the rounds of `s.cfg` over the SuperNodes of
    `grid` and write the run directory `s.out`."""
    from prismfl.eval.evaluate import quick_fid

    return engine.run(s.cfg, s.out, GridTransport(grid, s), resume=s.resume, log=log, on_round=on_round,
                      quick_fid=quick_fid)  # fmt: skip


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
