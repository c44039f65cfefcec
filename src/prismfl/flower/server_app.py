"""The Flower ServerApp: a thin adapter that moves prismfl's messages between SuperNodes.

What a round computes (client choice, aggregation, MADA, the records) is prismfl's own code
(fl.task, fl.protocol, fl.simulate); this module only sends and collects messages, with a timeout
on every wait, and writes the same run directory as the in-process simulator. With the same seed
and config the global scores after every round equal the simulator's bit for bit.

Faults: a client whose reply is an error, does not come within the reply timeout, or does not
decode (a WireError) is left out of the round and listed under "failures" in that round's
metrics record; the round goes on if at least min-replies uploads are good, otherwise the run
stops with an error (after logging the round as "aborted"). A client that failed gets the full
global state the next time it is chosen, since the server no longer knows what its replica holds.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from prismfl import runio
from prismfl.data.sources import dataset_info
from prismfl.errors import PrismError
from prismfl.fl import codec, simulate, task, wire
from prismfl.fl.protocol import aggregate_round, catch_up_rounds
from prismfl.flower.client_app import scores_crc
from prismfl.flower.payload import from_array, wire_record
from prismfl.flower.settings import ServerSettings, server_settings
from prismfl.model import masked

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


def setup_clients(grid: Grid, s: ServerSettings, n: int, table_hash: int) -> tuple[dict[int, int], list[dict]]:
    """Send the RunConfig to every node; return {partition id: node id} and the setup replies by partition."""
    k = s.cfg.partition.num_clients
    nodes = wait_for_nodes(grid, k, s.connect_timeout)
    request = RecordDict({"prismfl": ConfigRecord({"config": json.dumps(s.cfg.to_dict())})})
    got = exchange(grid, {node: request for node in nodes}, MessageType.QUERY, s.reply_timeout, "setup")
    node_of: dict[int, int] = {}
    infos: dict[int, dict] = {}
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
    missing = sorted(set(range(k)) - set(node_of))
    if missing:
        raise PrismError(f"no SuperNode holds partition(s) {missing}")
    return node_of, [infos[i] for i in range(k)]


def catch_up(synced: int | None, rnd: int, deltas: dict[int, bytes], delta_sizes: dict[int, int],
             state: bytes, broadcast: str) -> list[bytes]:  # fmt: skip
    """What a client that holds round `synced` (None: unknown) needs to reach round rnd - 1: the
    missed deltas, or the full state when that is smaller (protocol.catch_up_rounds decides)."""
    if broadcast == "float32" or synced is None:
        return [state]
    rounds = catch_up_rounds(synced, rnd - 1, delta_sizes, len(state))
    return [state] if rounds is None else [deltas[r] for r in rounds]


def prune(deltas: dict[int, bytes], state_size: int) -> None:
    """Keep only the newest deltas whose sum is at most a full state: older ones are never sent."""
    while sum(len(d) for d in deltas.values()) > state_size:
        del deltas[min(deltas)]


def run_federation(grid: Grid, s: ServerSettings, on_round=None) -> Path:
    """Run the rounds of `s.cfg` over the SuperNodes of `grid` and write the run directory `s.out`."""
    cfg, out = s.cfg, s.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrismError(f"{out} is not empty: choose a new run config 'out-dir'")
    model = task.build_model(cfg)
    n = masked.num_maskable(model)
    table_hash = wire.layer_table_hash(masked.layer_table(model))
    k_total = cfg.partition.num_clients

    node_of, infos = setup_clients(grid, s, n, table_hash)
    first = json.loads(infos[0]["model-info"])
    privacy = first["privacy"] and {key: v for key, v in first["privacy"].items() if key != "clip"}
    model_info = {"feature_net": first["feature_net"], "privacy": privacy}
    table = np.array([info["class-counts"] for info in infos], dtype=np.int64)
    view = SimpleNamespace(table=table, class_names=list(dataset_info(cfg.data.dataset).class_names),
                           train=SimpleNamespace(source=infos[0]["source"]))  # fmt: skip
    simulate.start_run_dir(out, cfg, view, log)
    log(f"model: {cfg.model.arch}, {n:,} maskable weights ({codec.packed_size(n):,} bytes as packed bits)")

    scores = task.initial_scores(cfg, n)
    synced: list[int | None] = [0] * k_total  # the round each client's replica holds (None: unknown)
    deltas: dict[int, bytes] = {}
    delta_sizes: dict[int, int] = {}
    state_size = wire.HEADER.size + 4 * n
    runio.truncate_metrics(out, 0)
    for rnd in range(1, cfg.train.rounds + 1):
        t_round = time.perf_counter()
        chosen = task.select_clients(cfg, rnd)
        state = wire.encode_state(scores, round_=rnd - 1, table_hash=table_hash)
        crc = scores_crc(scores)
        contents, down = {}, 0
        for k in chosen:
            messages = catch_up(synced[k], rnd, deltas, delta_sizes, state, cfg.train.broadcast)
            down += sum(len(m) for m in messages)
            content = RecordDict({"prismfl": ConfigRecord({"round": rnd, "scores-crc32": crc})})
            if messages:
                content["broadcast"] = wire_record(messages)
            contents[node_of[k]] = content
            synced[k] = rnd - 1
        got = exchange(grid, contents, MessageType.TRAIN, s.reply_timeout, f"round-{rnd}")

        good, failures = {}, []
        for k in chosen:
            reply = got.replies.get(node_of[k])
            if reply is None:
                why = "message not accepted by the SuperLink" if node_of[k] in got.unsent \
                    else f"no reply within {s.reply_timeout:g} s"  # fmt: skip
            elif reply.has_error():
                why = _error(reply)
            else:
                try:
                    upload = from_array(reply.content["upload"]["000"])
                    mask = wire.decode_upload(upload, scores, round_=rnd, table_hash=table_hash)
                    good[k] = (upload, mask, reply.content["metrics"])
                    continue
                except (wire.WireError, KeyError, ValueError) as exc:
                    why = f"upload rejected: {type(exc).__name__}: {exc}"
            failures.append({"client": k, "node": str(node_of[k]), "error": why})
            synced[k] = None
            log(f"round {rnd}: client {k} left out ({why})")
        needed = min(s.min_replies, len(chosen))
        if len(good) < needed:
            runio.append_metrics(out, {"round": rnd, "aborted": True, "failures": failures, "replies": len(good),
                                       "min_replies": needed})  # fmt: skip
            raise PrismError(
                f"round {rnd}: {len(good)} good uploads of {len(chosen)}, fewer than min-replies = {needed}; "
                f"the run stops (last complete round {rnd - 1}; see metrics.jsonl)"
            )

        used = sorted(good)  # the simulator's order: uploads sorted by client
        uploads = [good[k][0] for k in used]
        outcome = aggregate_round(  # the uploads were decoded (and so validated) as they arrived
            scores, [good[k][1] for k in used], round_=rnd, table_hash=table_hash, smoothing=cfg.train.smoothing,
            mada=simulate.mada_on(cfg), rng=task.generator_for(cfg.seed, "mada", rnd),
        )  # fmt: skip
        scores = outcome.scores
        deltas[rnd] = outcome.broadcast
        delta_sizes[rnd] = len(outcome.broadcast)
        prune(deltas, state_size)
        metrics = [good[k][2] for k in used]
        record = simulate.round_record(
            rnd, n, used, uploads, outcome, [m["loss"] for m in metrics], [m["start-loss"] for m in metrics],
            down, time.perf_counter() - t_round, sum(m["train-seconds"] for m in metrics), privacy,
        )  # fmt: skip
        checkpoint = simulate.round_checkpoint(cfg, rnd, scores, None, synced, delta_sizes, None, model_info)
        simulate.save_round(out, cfg, record, checkpoint, scores, extra={"failures": failures} if failures else None)
        log(f"round {rnd}/{cfg.train.rounds}: loss {record.loss:.4f}, {len(used)}/{len(chosen)} clients, "
            f"{record.upload_bytes:,} bytes up, {record.seconds:.1f} s")  # fmt: skip
        if on_round is not None:
            on_round(rnd, scores.clone())

    simulate.finish_run(out, cfg, scores, model_info, log)
    return out


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
