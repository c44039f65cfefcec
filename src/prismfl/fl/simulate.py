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

from prismfl.config import RunConfig
from prismfl.fl import faults, task
from prismfl.fl.client import (
    ClientContext,
    ClientRuntime,
    class_table_of,
    client_context,
    reported_counts,
    warm_start,
)
from prismfl.fl.engine import Setup, run
from prismfl.fl.methods.base import Downlink, Method, Upload
from prismfl.loss.matching import combine_stats
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
        self.ctx = ctx = client_context(cfg, method.build_model, task.resolve_device(cfg.train.device), log)
        if checkpoint is None:  # each client computes (and, with privacy on, privatises) its statistics once
            for k in progress_bar(range(cfg.partition.num_clients), desc="client statistics"):
                if method.holds_data(k):
                    client = ClientRuntime.released(k, method.release(ctx, *method.client_data(ctx, k)))
                    method.init_client(ctx, client)
                    self.clients[k] = client
        else:  # never recomputed: a private release is made once, and its noise is not reproducible
            self.clients = restore_clients(checkpoint["clients"], cfg.loss.tracker_lr)
            self.sent = {k: t.numpy().tobytes() for k, t in checkpoint["clients"].get("sent", {}).items()}
        first = next(iter(self.clients.values())).privacy
        private, rows, counts = not math.isinf(cfg.privacy.epsilon), [], []
        for k in range(cfg.partition.num_clients):
            client = self.clients.get(k, ClientRuntime(k, None))
            row, reported = reported_counts(client, ctx.fed.table[k], private)
            rows.append(row)
            if reported is not None:
                counts.append(reported)
        table, names = class_table_of(rows, ctx.fed.class_names)
        shared = {k: c.shared.public() if cfg.privacy.secagg else c.shared for k, c in self.clients.items()
                  if c.shared is not None}  # fmt: skip
        warm, warm_info = None, None
        if checkpoint is None and cfg.train.warm_start and method.warm_starts:
            # on the public images (no privacy cost), or else on the clients' pooled statistics: the sum of
            # what each released, which the server would learn from them as one more message
            held = [c.stats for c in self.clients.values() if c.stats is not None]
            pooled = None if len(ctx.fed.public_idx) else combine_stats(held)
            warm, warm_info = warm_start(ctx, cfg.train.warm_start, pooled)
        target = ctx.shrink_target() if cfg.privacy.secagg and checkpoint is None else None  # the server shrinks
        return Setup(
            num_weights=ctx.num_weights,
            table_hash=ctx.table_hash,
            class_table=table,
            class_counts=np.sum(counts, axis=0).tolist() if counts else None,
            class_names=names,
            source=ctx.fed.train.source,
            feature_meta=ctx.feature_meta,
            privacy=first and {key: v for key, v in first.items() if key != "clip"},
            shared=shared or None,
            warm_start=warm,
            warm_info=warm_info,
            shrink_target=target,
        )

    def share_pool(self, pooled) -> None:
        for client in self.clients.values():
            client.take_pool(self.cfg, pooled)

    def secagg_masked(self, keys: dict[int, bytes], context: bytes) -> dict[int, bytes]:
        return {k: self.clients[k].shared.masked(k, keys, context).tobytes() for k in keys}

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
                up.data = faults.forge(self.cfg, honest=honest, replica=self.clients[k].replica, rnd=rnd, k=k,
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
    return run(cfg, out, InProcess(cfg), resume=resume, log=log)
