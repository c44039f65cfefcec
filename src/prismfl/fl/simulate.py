"""The in-process transport: every client lives in this process and the engine calls them in turn.

It only moves data: each chosen client gets exactly the bytes Flower would carry (the same method
code decodes them into its replica of the global state), and its upload goes back as bytes. Faults
that Flower meets for real (lost uploads, hostile clients) are injected here on request (`faults`). The
clients' states are part of the checkpoint, so a killed run resumed with --resume ends in the same
state as one that was never interrupted.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from prismfl import schema
from prismfl.config import RunConfig
from prismfl.device import resolve_device
from prismfl.errors import PrismError
from prismfl.fl import faults
from prismfl.fl.client import (
    ClientContext,
    ClientRuntime,
    class_table_of,
    client_context,
    federation_modes,
    modes_message,
    moments_message,
    released_moments,
    reported_counts,
    statistics_message,
    statistics_of_message,
    warm_start,
)
from prismfl.fl.engine import Setup, run
from prismfl.fl.methods.base import Downlink, Method, Upload
from prismfl.fl.selection import select_clients
from prismfl.loss.matching import combine_stats
from prismfl.model import masked
from prismfl.progress import bar as progress_bar
from prismfl.safestate import StateError


class InProcess:
    name = "simulator"
    min_replies = 1

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.method: Method | None = None
        self.ctx: ClientContext | None = None
        self.clients: dict[int, ClientRuntime] = {}
        self.sent: dict[int, bytes] = {}  # each client's last honest upload, for the replay attack

    def setup(self, method: Method, checkpoint: dict | None, log) -> Setup:
        cfg = self.cfg
        self.method = method
        self.ctx = ctx = client_context(cfg, method.build_model, resolve_device(cfg.train.device), log)
        moments = cfg.model.modes > 1 and not len(ctx.fed.public_idx)  # the modes from the clients' moment sums
        private = not math.isinf(cfg.privacy.epsilon)
        if moments and checkpoint is not None and private:
            raise PrismError("a private run whose modes come from the clients' moment sums cannot resume: they were "
                             "released once, with noise that cannot be drawn again; start a new run")  # fmt: skip
        released = [released_moments(cfg, ctx.fed, k) for k in range(cfg.partition.num_clients)] if moments else []
        if moments:  # before any client computes its images' codes
            ctx.fed.given_modes = federation_modes(cfg, released, ctx.fed.train.images.shape[1:])
        if checkpoint is None:  # each client computes (and, with privacy on, privatises) its statistics once
            for k in progress_bar(range(cfg.partition.num_clients), desc="client statistics"):
                if method.holds_data(k):
                    client = ClientRuntime.released(k, method.release(ctx, *method.client_data(ctx, k)))
                    method.init_client(ctx, client)
                    self.clients[k] = client
        else:  # never recomputed: a private release is made once, and its noise is not reproducible
            self.clients, self.sent = restore(checkpoint, method, expect_of(method, ctx, checkpoint["round"]))
        first = next(iter(self.clients.values())).privacy
        rows, counts = [], {}
        for k in range(cfg.partition.num_clients):
            client = self.clients.get(k, ClientRuntime(k, None))
            row, reported = reported_counts(client, ctx.fed.table[k], private)
            rows.append(row)
            if reported is not None:
                counts[k] = reported
        table, names = class_table_of(rows, ctx.fed.class_names)
        shared = {k: c.shared.public() if cfg.privacy.secagg else c.shared for k, c in self.clients.items()
                  if c.shared is not None}  # fmt: skip
        warm, warm_info = None, None
        traffic = {"up": 0, "down": 0}  # what Flower's set-up would carry (payload bytes), counted here alike
        if checkpoint is None and cfg.train.warm_start and method.warm_starts:
            # on the public images (no privacy cost), or else on the clients' pooled statistics: the sum of
            # what each released, as its message carries it (what Flower's server decodes)
            pooled = None
            if not len(ctx.fed.public_idx):
                sent = [statistics_message(c.stats) for c in self.clients.values() if c.stats is not None]
                pooled = combine_stats([statistics_of_message(b, method.spec.codes) for b in sent])
                traffic["up"] += sum(len(b) for b in sent)
            warm, warm_info = warm_start(ctx, cfg.train.warm_start, pooled)
        if checkpoint is None and moments:
            traffic["up"] += sum(len(moments_message(sums)) for sums in released)
            traffic["down"] += len(modes_message(ctx.fed.modes)) * cfg.partition.num_clients
        target = ctx.shrink_target() if cfg.privacy.secagg and checkpoint is None else None  # the server shrinks
        return Setup(
            num_weights=ctx.num_weights,
            table_hash=ctx.table_hash,
            class_table=table,
            class_counts=np.sum(list(counts.values()), axis=0).tolist() if counts else None,
            client_counts=counts or None,
            class_names=names,
            source=ctx.fed.train.source,
            feature_meta=ctx.feature_meta,
            privacy=first and {key: v for key, v in first.items() if key != "clip"},
            shared=shared or None,
            warm_start=warm,
            warm_info=warm_info,
            shrink_target=target,
            setup_traffic=traffic,
        )

    def share_pool(self, pooled) -> None:
        for client in self.clients.values():
            client.take_pool(self.cfg, pooled)

    def secagg_exchange(self, stage: str, requests: dict[int, dict]) -> tuple[dict[int, dict], dict[int, str]]:
        """One stage of the secure sum; with faults.dropout, the clients that drop out (drawn as for a
        round 0) send nothing from their masked vector on, after the key exchange."""
        from prismfl.secagg import SecAggError

        lost = faults.draw(self.cfg, 0, sorted(self.clients)) if stage != "shares" else {}
        replies, failures = {}, {}
        for k, request in requests.items():
            if lost.get(k) in faults.LOST:
                failures[k] = faults.LOST[lost[k]]
                continue
            try:
                replies[k] = self.clients[k].shared.answer(k, stage, request)
            except SecAggError as exc:  # what a node's error reply carries on Flower
                failures[k] = str(exc)
        return replies, failures

    def exchange(self, rnd: int, downlinks: dict[int, Downlink]) -> tuple[dict[int, Upload], list[dict]]:
        """Every client's round, then the faults of `cfg.faults` (fl/faults.py): lost uploads, hostile ones."""
        fate = faults.draw(self.cfg, rnd, sorted(downlinks))
        replies, failures = {}, []
        for k in progress_bar(sorted(downlinks), desc=f"round {rnd} clients"):
            up = self.method.client_round(self.ctx, self.clients[k], downlinks[k])
            if fate.get(k) in faults.LOST:
                failures.append({"client": k, "error": faults.LOST[fate[k]]})
                continue
            honest = up.data
            if fate.get(k) == "byzantine":
                held = self.clients[k].replica
                held = self.method.received_scores(self.ctx, downlinks[k]) if held is None else held
                up.data = faults.forge(self.cfg, honest=honest, replica=held, rnd=rnd, k=k,
                                       table_hash=self.ctx.table_hash, num_weights=self.ctx.num_weights,
                                       earlier=self.sent.get(k))  # fmt: skip
            if self.cfg.faults.attack == "replay":
                self.sent[k] = honest
            replies[k] = up
        return replies, failures

    def client_states(self) -> dict:
        """Every client's state; replicas of the same round are identical, so each is stored once."""
        states, replicas = [], {}
        for client in self.clients.values():
            state = client.state_dict()
            if state["replica"] is not None:
                replicas.setdefault(state["held_round"], state["replica"])
                state["replica"] = None
            states.append(state)
        sent = {k: torch.frombuffer(bytearray(data), dtype=torch.uint8) for k, data in self.sent.items()}
        return {"clients": states, "replicas": replicas, "sent": sent}


def expect_of(method: Method, ctx: ClientContext, round_: int) -> schema.Expect:
    """What a checkpoint of round `round_` must fit in this run: the model's N and layer-table hash, the
    clients and how many images each holds, the feature net's layer shapes and the shapes of the tensors
    local training updates."""
    cfg, spec = method.cfg, method.spec
    with torch.no_grad():
        features = ctx.extract(torch.zeros(2, spec.channels, spec.img_size, spec.img_size, device=ctx.device))
    images = {k: len(method.client_indices(ctx, k)) for k in range(cfg.partition.num_clients) if method.holds_data(k)}
    return schema.Expect(num_weights=ctx.num_weights, table_hash=ctx.table_hash,
                         num_clients=cfg.partition.num_clients, round=round_,
                         features=[tuple(f.shape[1:]) for f in features],
                         params=[tuple(p.shape) for p in masked.trainable(ctx.model)], images=images)  # fmt: skip


def restore(checkpoint: dict, method: Method, expect: schema.Expect) -> tuple[dict[int, ClientRuntime], dict]:
    """The clients of a checkpoint (and the uploads the replay attack sends again), once all of it fits
    this run (`expect_of`): the method's global state (Method.check_state), the clients that hold data
    in order, each one's state (ClientRuntime.from_state_dict, as a checkpoint holds it), each round's
    replica once, and what the server believes each client holds. A StateError naming the first field
    that does not fit (rundir.check_progress has checked the round, records and model info before)."""
    cfg = method.cfg
    method.check_state(checkpoint["server"], expect.num_weights, expect.table_hash, expect.round)
    holders = [k for k in range(cfg.partition.num_clients) if method.holds_data(k)]
    fields = method.client_fields(expect)
    keeps = not isinstance(fields["replica"], schema.Null)
    before = expect.rounds(expect.round - 1)
    replay = cfg.faults.attack == "replay"
    top = schema.Table({
        "clients": schema.List(schema.ANY, len(holders), what=f"a list of {len(holders)} client states (clients "
                               f"{holders[0]}..{holders[-1]}, which hold data)"),
        "replicas": schema.IntKeys(before, fields["replica"] if keeps else
                                   schema.Never("no replica (this method keeps none)")),
        "sent": schema.IntKeys(expect.client, schema.Tensor(torch.uint8, (None,)) if replay else
                               schema.Never("no earlier upload (faults.attack is not 'replay')")),
    }, what="the clients' states (a table)")  # fmt: skip
    saved = checkpoint["clients"]
    schema.check(top, saved, "checkpoint", "clients")
    trained = trained_rounds(cfg, holders, expect.round)
    clients = {}
    for i, state in enumerate(saved["clients"]):
        path = f"clients.clients[{i}]"
        try:
            client = ClientRuntime.from_state_dict(state, cfg.loss.tracker_lr, cfg=cfg, expect=expect,
                                                   fields={**fields, "replica": schema.Null()}, where="checkpoint",
                                                   path=path)  # fmt: skip
        except ValueError as exc:
            raise StateError(f"checkpoint field {path}: {exc}") from None
        if client.k != holders[i]:
            schema.refuse(f"{path}.k", f"{holders[i]} (the clients that hold data are {holders}, in order)", client.k)
        check_trained(client, trained[client.k], keeps, path, cfg.loss.tracker)
        if client.privacy is None and expect.images and client.stats.count != expect.images[client.k]:
            schema.refuse(f"{path}.stats.count", f"{expect.images[client.k]} (the images client {client.k} holds: "
                          "its statistics are exact)", client.stats.count)  # fmt: skip
        if keeps:
            client.replica = saved["replicas"].get(client.held_round)
            if client.replica is None:
                schema.refuse(f"{path}.held_round", "a round whose replica the checkpoint keeps "
                              f"({sorted(saved['replicas'])})", client.held_round)  # fmt: skip
        clients[client.k] = client
    if keeps:
        extra = sorted(set(saved["replicas"]) - {c.held_round for c in clients.values()})
        if extra:
            schema.refuse(f"clients.replicas[{extra[0]}]", "only replicas of rounds a client holds",
                          saved["replicas"][extra[0]])  # fmt: skip
        for k, synced in enumerate(checkpoint["server"].get("synced", [])):
            if synced is not None and synced != clients[k].held_round:
                schema.refuse(f"server.synced[{k}]", f"null or {clients[k].held_round} (the round client {k} "
                              "holds)", synced)  # fmt: skip
    return clients, {k: t.numpy().tobytes() for k, t in saved["sent"].items()}


def trained_rounds(cfg: RunConfig, holders: list[int], last: int) -> dict[int, list[int]]:
    """The rounds 1..last in which each client that holds data trained: those that chose it (this transport
    runs every chosen client's round, whatever becomes of its upload), or all of them where one client
    holds all the data (central)."""
    rounds = {k: [] for k in holders}
    for r in range(1, last + 1):
        for k in holders if len(holders) == 1 else select_clients(cfg, r):
            if k in rounds:
                rounds[k].append(r)
    return rounds


def check_trained(client: ClientRuntime, rounds: list[int], keeps: bool, path: str, tracker: str) -> None:
    """A client's state is that of the rounds it trained in: an Adam state and started trackers once it
    has trained, none before; with a replica, the one of the round before its last."""
    k, trained = client.k, bool(rounds)
    when = f"client {k} trained in rounds {rounds[:5]}{'...' if len(rounds) > 5 else ''}" if trained else \
        f"client {k} has not trained yet"  # fmt: skip
    held = rounds[-1] - 1 if trained and keeps else 0
    if client.held_round != held:
        schema.refuse(f"{path}.held_round", f"{held} ({when})", client.held_round)
    state = client.state
    if (state.optimizer is not None) != trained:
        schema.refuse(f"{path}.state.optimizer", f"{'an Adam state' if trained else 'null'} ({when})",
                      state.optimizer)  # fmt: skip
    if tracker != "none" and bool(state.tracker.vectors) != trained:
        schema.refuse(f"{path}.state.tracker.vectors", f"{'its trackers' if trained else '[]'} ({when})",
                      state.tracker.vectors)  # fmt: skip
    if trained and len(state.optimizer["state"]) != len(state.optimizer["param_groups"][0]["params"]):
        schema.refuse(f"{path}.state.optimizer.state", f"the moments of every parameter ({when})",
                      state.optimizer["state"])  # fmt: skip


def restore_clients(saved: dict, tracker_lr: float) -> dict[int, ClientRuntime]:
    """The clients of a checkpoint; a StateError (one line) if it does not hold what they need."""
    clients = {}
    try:
        for state in saved["clients"]:
            client = ClientRuntime.from_state_dict(state, tracker_lr)
            client.replica = saved["replicas"].get(client.held_round)
            clients[client.k] = client
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise StateError(f"the checkpoint's client states are not usable: {type(exc).__name__}: {exc}") from None
    if not clients:
        raise StateError("the checkpoint holds no client state")
    return clients


def train(cfg: RunConfig, out: str | Path, *, resume: bool = False, log=print) -> Path:
    """Run (or continue) a job of any method in this process and write its run directory."""
    from prismfl.eval.evaluate import quick_fid

    return run(cfg, out, InProcess(cfg), resume=resume, log=log, quick_fid=quick_fid)
