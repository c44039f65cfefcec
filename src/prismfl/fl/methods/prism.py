"""PRISM (METHOD.md): clients upload one sampled binary mask; the server averages the masks into new
global scores, blended with the old ones by MADA's lambda (or not, `train.mada = false`: the paper's
PRISM-dagger), and broadcasts the round as a delta (counts + lambda) from which clients rebuild the
new scores bit for bit. A client that missed rounds catches up with their deltas, or with the full
float32 state when that is smaller.

With a server optimiser (`train.server_momentum` = beta > 0) the global state is the scores and the
server's velocity: a client's replica holds both (2N float32, scores first), a delta still carries only
counts + lambda (both sides run the same `aggregate.momentum_step`), and the full state is two state
messages of the same round, the scores then the velocity.
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict

import torch

from prismfl.errors import PrismError
from prismfl.fl import aggregate, task, wire
from prismfl.fl.client import ClientContext, ClientRuntime, train_round
from prismfl.fl.methods.base import Downlink, Method, Outcome, Plan, Upload, is_weights, masked_final_model, scores_crc
from prismfl.modelfile import PrismModel


def catch_up_rounds(last_synced: int, current: int, delta_sizes: dict[int, int], state_size: int) -> list[int] | None:
    """What a client that holds round `last_synced` needs to reach round `current`: the rounds whose
    deltas it missed, or None when the full state is smaller than those deltas."""
    missed = list(range(last_synced + 1, current + 1))
    return missed if sum(delta_sizes[r] for r in missed) <= state_size else None


def prune(deltas: dict[int, torch.Tensor], state_size: int) -> None:
    """Keep only the newest deltas whose sum is at most a full state: older ones are never sent."""
    while sum(d.numel() for d in deltas.values()) > state_size:
        del deltas[min(deltas)]


def apply_broadcast(replica: torch.Tensor, message: bytes, *, round_: int, table_hash: int,
                    beta: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Client side: rebuild the new global state from the previous one and the round's delta (the
    scores; with server momentum beta > 0, the scores and the velocity, concatenated)."""
    n = len(replica) // 2 if beta else len(replica)
    scores = replica[:n].cpu()
    d = wire.decode_delta(message, scores, round_=round_, table_hash=table_hash)
    if not beta:
        return aggregate.apply_round(scores, d.counts, d.m, d.lam, d.smoothing)
    proposal = aggregate.aggregate_scores(d.counts, d.m, d.smoothing)
    step = 1.0 if d.lam is None else d.lam
    return torch.cat(aggregate.momentum_step(scores, proposal, replica[n:].cpu(), beta, step, d.smoothing))


MEMO_SIZE = 8


def catch_up(replica: torch.Tensor, held: int, messages: list[bytes], *, num_weights: int, table_hash: int,
             memo: OrderedDict | None = None, beta: float = 0.0) -> tuple[int, torch.Tensor]:  # fmt: skip
    """Apply a round's downlink (full states and deltas, in order) to a replica of round `held`
    (with server momentum beta > 0: scores and velocity; a full state is then two messages).

    `memo` (one per process) keeps the last few results keyed by (round, message, replica) checksums:
    the clients a process serves decode each round's delta once, not once each (0.6 s for 1.4M weights).
    """
    if replica.numel() != (2 if beta else 1) * num_weights:
        raise PrismError(f"a replica of {replica.numel():,} values for {num_weights:,} weights"
                         f"{' (scores and velocity)' if beta else ''}: a damaged or foreign client state")  # fmt: skip
    messages = list(messages)
    while messages:
        data = messages.pop(0)
        if wire.parse(data, table_hash=table_hash, num_weights=num_weights).kind == wire.KIND_STATE:
            held, replica = wire.decode_state(data, num_weights=num_weights, table_hash=table_hash)
            if beta:
                if not messages:
                    raise wire.UnexpectedMessage("a full state without the server's velocity (server momentum)")
                at, velocity = wire.decode_state(messages.pop(0), num_weights=num_weights, table_hash=table_hash)
                if at != held:
                    raise wire.UnexpectedMessage(f"the velocity is of round {at}, the scores of round {held}")
                replica = torch.cat([replica, velocity])
            continue
        # a delta takes the replica one round forward; it names the round it must be applied to
        key = (held + 1, zlib.crc32(data), scores_crc(replica))
        if memo is not None and key in memo:
            memo.move_to_end(key)
            replica = memo[key]
        else:
            replica = apply_broadcast(replica, data, round_=held + 1, table_hash=table_hash, beta=beta)
            if memo is not None:
                memo[key] = replica
                while len(memo) > MEMO_SIZE:
                    memo.popitem(last=False)
        held += 1
    return held, replica


class Prism(Method):
    name = "prism"
    warm_starts = True
    STATE = {"scores": "weights"}

    def __init__(self, cfg, mada: bool | None = None):
        super().__init__(cfg)
        self.mada = cfg.train.mada if mada is None else mada
        self.beta = cfg.train.server_momentum  # > 0: the global state is the scores and a velocity

    # ---- client side

    def init_client(self, ctx: ClientContext, client: ClientRuntime) -> None:
        scores = task.initial_scores(self.cfg, ctx.num_weights)
        client.held_round, client.replica = 0, torch.cat([scores, torch.zeros_like(scores)]) if self.beta else scores

    def client_round(self, ctx: ClientContext, client: ClientRuntime, down: Downlink) -> Upload:
        held, replica = catch_up(client.replica, client.held_round, down.messages, num_weights=ctx.num_weights,
                                 table_hash=ctx.table_hash, memo=ctx.replica_memo, beta=self.beta)  # fmt: skip
        scores = replica[: ctx.num_weights]
        if held != down.round - 1 or (down.check is not None and scores_crc(replica) != down.check):
            raise PrismError(f"client {client.k}: its replica of round {held} does not match the server's "
                             f"round {down.round - 1}")  # fmt: skip
        client.held_round, client.replica = held, replica
        t0 = time.perf_counter()
        result = train_round(ctx, client, scores, round_=down.round, steps=down.steps)
        data = wire.encode_upload(result.mask.cpu(), scores.cpu(), round_=down.round, table_hash=ctx.table_hash,
                                  client=client.k, coder=self.cfg.train.upload_coder)  # fmt: skip
        return Upload(data, float(result.loss), float(result.start_loss), time.perf_counter() - t0)

    # ---- server side

    def init_state(self, num_weights: int, table_hash: int) -> dict:
        k = self.cfg.partition.num_clients
        return {"num_weights": num_weights, "table_hash": table_hash,
                "scores": task.initial_scores(self.cfg, num_weights),
                "synced": [0] * k,  # the round whose global scores each client holds (None: unknown)
                "delta_sizes": {}, "deltas": {},
                # train.server_momentum: the server's velocity (the clients' replicas hold it too)
                **({"velocity": torch.zeros(num_weights)} if self.beta else {})}  # fmt: skip

    def warm_start(self, state: dict, message: bytes) -> None:
        """The round-0 scores trained on the public hold-out (decoded like any message: a state of round 0
        for this model); no client holds them yet, so each gets the full state when first chosen."""
        held, scores = wire.decode_state(message, num_weights=state["num_weights"], table_hash=state["table_hash"])
        if held != 0:
            raise wire.UnexpectedMessage(f"warm-start scores of round {held}, not of round 0")
        state["scores"] = scores
        state["synced"] = [None] * len(state["synced"])

    def plan(self, state: dict, rnd: int) -> Plan:
        chosen = task.select_clients(self.cfg, rnd)
        scores, th = state["scores"], state["table_hash"]
        # with deltas, the full state a client gets once is range-coded (lossless; `train.broadcast =
        # "float32"` sends the raw float32 scores every round, as the paper's baseline does)
        coder = "auto" if self.cfg.train.broadcast == "delta" else "float32"
        full = [wire.encode_state(scores, round_=rnd - 1, table_hash=th, coder=coder)]
        global_state = scores
        if self.beta:  # the velocity too, for a client that rebuilds later rounds from their deltas
            full.append(wire.encode_state(state["velocity"], round_=rnd - 1, table_hash=th, coder=coder))
            global_state = torch.cat([scores, state["velocity"]])
        crc = scores_crc(global_state)
        downlinks, down = {}, 0
        for k in chosen:
            synced = state["synced"][k]
            rounds = None
            if self.cfg.train.broadcast == "delta" and synced is not None:
                rounds = catch_up_rounds(synced, rnd - 1, state["delta_sizes"], sum(len(m) for m in full))
            messages = full if rounds is None else [state["deltas"][r].numpy().tobytes() for r in rounds]
            down += sum(len(m) for m in messages)
            downlinks[k] = Downlink(rnd, messages, self.cfg.train.local_steps, crc)
            state["synced"][k] = rnd - 1
        return Plan(chosen, downlinks, down)

    def decode(self, state: dict, rnd: int, k: int, data: bytes) -> torch.Tensor:
        return wire.decode_upload(data, state["scores"], round_=rnd, table_hash=state["table_hash"], client=k)

    def aggregate(self, state: dict, rnd: int, uploads: dict[int, tuple[bytes, torch.Tensor]],
                  sizes: list[int], trim: int = 0) -> Outcome:  # fmt: skip
        """`trim` > 0: coordinate-wise trimmed counts (robust.rule = "trimmed"): per weight, the `trim`
        highest and `trim` lowest of the m bits are left out, so the counts are over m - 2 trim uploads."""
        old = state["scores"].cpu()
        masks = [uploads[k][1] for k in sorted(uploads)]
        smoothing = self.cfg.train.smoothing
        counts, m = aggregate.count_masks(masks), len(masks)
        if trim:
            counts, m = aggregate.trim_counts(counts, m, trim)
        proposal = aggregate.aggregate_scores(counts, m, smoothing)
        lam = aggregate.mada_lambda(old, proposal, task.generator_for(self.cfg.seed, "mada", rnd)) if self.mada \
            else None  # fmt: skip
        if self.beta:
            step = 1.0 if lam is None else lam
            new, state["velocity"] = aggregate.momentum_step(old, proposal, state["velocity"], self.beta, step,
                                                             smoothing)  # fmt: skip
        else:
            new = aggregate.blend(old, proposal, lam)
        delta = wire.encode_delta(counts, m, lam, smoothing, old, round_=rnd, table_hash=state["table_hash"])
        state["scores"] = new
        state["deltas"][rnd] = torch.frombuffer(bytearray(delta), dtype=torch.uint8)
        state["delta_sizes"][rnd] = len(delta)
        prune(state["deltas"], (2 if self.beta else 1) * (wire.HEADER.size + 4 * state["num_weights"]))
        return Outcome(
            lam=lam,
            upload_bytes=sum(len(uploads[k][0]) for k in uploads),
            broadcast_bytes=len(delta),
            entropy_bound_bits=sum(aggregate.cross_entropy_bits(m, old) for m in masks),
            mask_entropy=aggregate.binary_entropy_bits(new),
        )

    def check_state(self, state: dict, num_weights: int) -> None:
        from prismfl.safestate import StateError

        super().check_state(state, num_weights)
        synced, sizes, deltas = state.get("synced"), state.get("delta_sizes"), state.get("deltas")
        ok = isinstance(synced, list) and len(synced) == self.cfg.partition.num_clients
        ok = ok and all(s is None or type(s) is int for s in synced)
        ok = ok and isinstance(sizes, dict) and all(type(k) is int and type(v) is int for k, v in sizes.items())
        ok = (
            ok
            and isinstance(deltas, dict)
            and all(
                type(k) is int and k in sizes and isinstance(v, torch.Tensor) and v.dtype == torch.uint8
                for k, v in deltas.items()
            )
        )
        if not ok:
            raise StateError("the checkpoint's record of what each client holds is not usable")
        if self.beta and not is_weights(state.get("velocity"), num_weights):
            raise StateError(f"the checkpoint's server velocity is not {num_weights:,} finite float32 values "
                             "(was it written without train.server_momentum?)")  # fmt: skip

    def client_lost(self, state: dict, k: int) -> None:
        state["synced"][k] = None

    def clients_restarted(self, state: dict) -> None:
        state["synced"] = [None] * len(state["synced"])

    def final_model(self, state: dict, rounds: int, info: dict) -> PrismModel:
        return masked_final_model(self.cfg, self.spec, state, rounds, info)
