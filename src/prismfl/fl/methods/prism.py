"""PRISM (METHOD.md): clients upload one sampled binary mask; the server averages the masks into new
global scores, blended with the old ones by MADA's lambda (or not, `train.mada = false`: the paper's
PRISM-dagger), and broadcasts the round as a delta (counts + lambda) from which clients rebuild the
new scores bit for bit. A client that missed rounds catches up with their deltas, or with the full
float32 state when that is smaller.

With a server optimiser (`train.server_momentum` = beta > 0) the global state is the scores and the
server's velocity: a client's replica holds both (2N float32, scores first), a delta still carries only
counts + lambda (both sides run the same `aggregate.momentum_step`), and the full state is two state
messages of the same round, the scores then the velocity.

With `train.broadcast = "quantized"` the downlink is instead one message a round, the same for every
client of the round: the global probabilities drawn to a few levels (fl/quantize.py). A client starts
from those levels' scores and codes its upload against them; it keeps no replica between rounds, and
the server, which keeps full precision, decodes the round's uploads against the same levels.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from prismfl import schema
from prismfl.capabilities import METHODS
from prismfl.errors import PrismError
from prismfl.fl import aggregate, quantize, wire
from prismfl.fl.client import ClientContext, ClientRuntime, train_round
from prismfl.fl.methods.base import Downlink, Method, Outcome, Plan, Upload, masked_final_model, scores_crc
from prismfl.fl.selection import clients_per_round, select_clients
from prismfl.model.build import initial_scores
from prismfl.modelfile import PrismModel
from prismfl.seeds import generator_for


def catch_up_rounds(last_synced: int, current: int, delta_sizes: dict[int, int], state_size: int) -> list[int] | None:
    """What a client that holds round `last_synced` needs to reach round `current`: the rounds whose
    deltas it missed, or None when the full state is smaller than those deltas."""
    missed = list(range(last_synced + 1, current + 1))
    return missed if sum(delta_sizes[r] for r in missed) <= state_size else None


def prune(deltas: dict[int, torch.Tensor], state_size: int) -> None:
    """Keep only the newest deltas whose sum is at most a full state: older ones are never sent."""
    while sum(d.numel() for d in deltas.values()) > state_size:
        del deltas[min(deltas)]


@dataclass(frozen=True)
class Rules:
    """What a client knows a broadcast delta of this run must carry (from the run's config): at most
    `max_m` uploads, the config's smoothing, and MADA's lambda exactly as the server computes it from
    the state both hold and the run seed (`mada`), or no lambda at all (not `mada`)."""

    max_m: int
    smoothing: float
    mada: bool
    seed: int

    def check(self, d: wire.Delta, scores: torch.Tensor, proposal: torch.Tensor, round_: int) -> None:
        if d.m > self.max_m:
            raise wire.UnexpectedMessage(f"broadcast delta aggregates m = {d.m} uploads; a round of this run "
                                         f"has at most {self.max_m}")  # fmt: skip
        if struct.pack("<d", d.smoothing) != struct.pack("<d", self.smoothing):
            raise wire.UnexpectedMessage(f"broadcast delta carries smoothing = {d.smoothing!r}; this run's is "
                                         f"{self.smoothing!r}")  # fmt: skip
        if not self.mada:
            if d.lam is not None:
                raise wire.UnexpectedMessage(f"broadcast delta carries lambda = {d.lam!r} in a run without MADA")
            return
        expected = aggregate.mada_lambda(scores, proposal, generator_for(self.seed, "mada", round_))
        if d.lam is None or struct.pack("<d", d.lam) != struct.pack("<d", expected):
            raise wire.UnexpectedMessage(f"broadcast delta carries lambda = {d.lam!r}; the state and the run seed "
                                         f"give {expected!r}")  # fmt: skip


def apply_broadcast(replica: torch.Tensor, message: bytes, *, round_: int, table_hash: int,
                    beta: float = 0.0, rules: Rules | None = None) -> torch.Tensor:  # fmt: skip
    """Client side: rebuild the new global state from the previous one and the round's delta (the
    scores; with server momentum beta > 0, the scores and the velocity, concatenated). With `rules`,
    the delta must carry what this run's server could have sent (Rules)."""
    n = len(replica) // 2 if beta else len(replica)
    scores = replica[:n].cpu()
    d = wire.decode_delta(message, scores, round_=round_, table_hash=table_hash,
                          max_m=wire.MAX_DELTA_M if rules is None else rules.max_m)  # fmt: skip
    proposal = aggregate.aggregate_scores(d.counts, d.m, d.smoothing)
    if rules is not None:
        rules.check(d, scores, proposal, round_)
    if not beta:
        return aggregate.blend(scores, proposal, d.lam)
    step = 1.0 if d.lam is None else d.lam
    return torch.cat(aggregate.momentum_step(scores, proposal, replica[n:].cpu(), beta, step, d.smoothing))


MEMO_SIZE = 8


def catch_up(replica: torch.Tensor, held: int, messages: list[bytes], *, num_weights: int, table_hash: int,
             memo: OrderedDict | None = None, beta: float = 0.0,
             rules: Rules | None = None) -> tuple[int, torch.Tensor]:  # fmt: skip
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
            replica = apply_broadcast(replica, data, round_=held + 1, table_hash=table_hash, beta=beta, rules=rules)
            if memo is not None:
                memo[key] = replica
                while len(memo) > MEMO_SIZE:
                    memo.popitem(last=False)
        held += 1
    return held, replica


class Prism(Method):
    caps = METHODS["prism"]
    STATE = {"scores": "weights"}

    def __init__(self, cfg, mada: bool | None = None):
        super().__init__(cfg)
        self.mada = cfg.train.mada if mada is None else mada
        self.beta = cfg.train.server_momentum  # > 0: the global state is the scores and a velocity
        # train.broadcast = "quantized": the levels of each round's broadcast (0: the lossless broadcasts)
        self.levels = cfg.train.broadcast_levels if cfg.train.broadcast == "quantized" else 0
        self._sent: tuple | None = None  # the quantized broadcast: (round, state crc, message, its scores)

    # ---- client side

    def rules(self) -> Rules:
        """What this run's broadcast deltas must carry (a client refuses any other)."""
        return Rules(clients_per_round(self.cfg), self.cfg.train.smoothing + 0.0, self.mada, self.cfg.seed)

    def init_client(self, ctx: ClientContext, client: ClientRuntime) -> None:
        if self.levels:  # every round brings its whole (quantized) state: nothing to keep before the first
            client.held_round, client.replica = 0, None
            return
        scores = initial_scores(self.cfg, ctx.num_weights)
        client.held_round, client.replica = 0, torch.cat([scores, torch.zeros_like(scores)]) if self.beta else scores

    def client_round(self, ctx: ClientContext, client: ClientRuntime, down: Downlink) -> Upload:
        if self.levels:
            return self._quantized_round(ctx, client, down)
        held, replica = catch_up(client.replica, client.held_round, down.messages, num_weights=ctx.num_weights,
                                 table_hash=ctx.table_hash, memo=ctx.replica_memo, beta=self.beta,
                                 rules=self.rules())  # fmt: skip
        scores = replica[: ctx.num_weights]
        if held != down.round - 1 or (down.check is not None and scores_crc(replica) != down.check):
            raise PrismError(f"client {client.k}: its replica of round {held} does not match the server's "
                             f"round {down.round - 1}")  # fmt: skip
        client.held_round, client.replica = held, replica
        return self._train(ctx, client, down, scores)

    def _quantized_round(self, ctx: ClientContext, client: ClientRuntime, down: Downlink) -> Upload:
        """A round of the quantized broadcast: one message, the round's levels; nothing kept after."""
        scores = self.received_scores(ctx, down)
        if down.check is not None and scores_crc(scores) != down.check:
            raise PrismError(f"client {client.k}: its quantized scores of round {down.round - 1} do not match "
                             "the server's")  # fmt: skip
        client.held_round, client.replica = 0, None  # it holds nothing after the round
        return self._train(ctx, client, down, scores)

    def received_scores(self, ctx: ClientContext, down: Downlink) -> torch.Tensor | None:
        """The scores a round's quantized broadcast stands for (None with the lossless broadcasts, whose
        scores are the client's replica)."""
        if not self.levels:
            return None
        if len(down.messages) != 1:
            raise wire.UnexpectedMessage(f"a quantized broadcast is one message, got {len(down.messages)}")
        indices = quantize.decode(down.messages[0], num_weights=ctx.num_weights, table_hash=ctx.table_hash,
                                  count=self.levels, round_=down.round - 1)  # fmt: skip
        return quantize.dequantize(indices, self.levels, self.cfg.train.smoothing)

    def _train(self, ctx: ClientContext, client: ClientRuntime, down: Downlink, scores: torch.Tensor) -> Upload:
        """Local training from the round's global scores, and the sampled mask coded against them."""
        t0 = time.perf_counter()
        result = train_round(ctx, client, scores, round_=down.round, steps=down.steps)
        data = wire.encode_upload(result.mask.cpu(), scores.cpu(), round_=down.round, table_hash=ctx.table_hash,
                                  client=client.k, coder=self.cfg.train.upload_coder)  # fmt: skip
        return Upload(data, float(result.loss), float(result.start_loss), time.perf_counter() - t0)

    # ---- server side

    def init_state(self, num_weights: int, table_hash: int) -> dict:
        k = self.cfg.partition.num_clients
        return {"num_weights": num_weights, "table_hash": table_hash,
                "scores": initial_scores(self.cfg, num_weights),
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

    def _broadcast(self, state: dict, rnd: int) -> tuple[bytes, torch.Tensor]:
        """The quantized broadcast before round `rnd` and the scores it stands for, drawn once per round
        and state (cached: the plan, the decodes and the aggregate of a round all need them)."""
        crc = scores_crc(state["scores"])
        if self._sent is None or self._sent[:2] != (rnd, crc):
            smoothing = self.cfg.train.smoothing
            indices = quantize.round_indices(state["scores"], self.levels, smoothing, self.cfg.seed, rnd)
            message = quantize.encode(indices, self.levels, round_=rnd - 1, table_hash=state["table_hash"])
            self._sent = (rnd, crc, message, quantize.dequantize(indices, self.levels, smoothing))
        return self._sent[2], self._sent[3]

    def reference(self, state: dict, rnd: int) -> torch.Tensor:
        """The global scores the clients of round `rnd` start from and code their uploads against: the
        state's own, or with the quantized broadcast, the round's levels."""
        return self._broadcast(state, rnd)[1] if self.levels else state["scores"]

    def _plan_quantized(self, state: dict, rnd: int, chosen: list[int]) -> Plan:
        message, scores = self._broadcast(state, rnd)
        crc, steps = scores_crc(scores), self.cfg.train.local_steps
        for k in chosen:
            state["synced"][k] = None  # a client keeps nothing between rounds
        return Plan(chosen, {k: Downlink(rnd, [message], steps, crc) for k in chosen}, len(message) * len(chosen))

    def plan(self, state: dict, rnd: int) -> Plan:
        chosen = select_clients(self.cfg, rnd)
        if self.levels:
            return self._plan_quantized(state, rnd, chosen)
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
        return wire.decode_upload(data, self.reference(state, rnd), round_=rnd, table_hash=state["table_hash"],
                                  client=k)  # fmt: skip

    def aggregate(self, state: dict, rnd: int, uploads: dict[int, tuple[bytes, torch.Tensor]],
                  sizes: list[int], trim: int = 0) -> Outcome:  # fmt: skip
        """`trim` > 0: coordinate-wise trimmed counts (robust.rule = "trimmed"): per weight, the `trim`
        highest and `trim` lowest of the m bits are left out, so the counts are over m - 2 trim uploads."""
        old, sent = state["scores"].cpu(), self.reference(state, rnd).cpu()
        broadcast = len(self._broadcast(state, rnd)[0]) if self.levels else 0
        masks = [uploads[k][1] for k in sorted(uploads)]
        smoothing = self.cfg.train.smoothing
        counts, m = aggregate.count_masks(masks), len(masks)
        if trim:
            counts, m = aggregate.trim_counts(counts, m, trim)
        proposal = aggregate.aggregate_scores(counts, m, smoothing)
        lam = aggregate.mada_lambda(old, proposal, generator_for(self.cfg.seed, "mada", rnd)) if self.mada \
            else None  # fmt: skip
        if self.beta:
            step = 1.0 if lam is None else lam
            new, state["velocity"] = aggregate.momentum_step(old, proposal, state["velocity"], self.beta, step,
                                                             smoothing)  # fmt: skip
        else:
            new = aggregate.blend(old, proposal, lam)
        state["scores"] = new
        if not self.levels:  # (with the quantized broadcast, the round's was its quantized state)
            delta = wire.encode_delta(counts, m, lam, smoothing, old, round_=rnd, table_hash=state["table_hash"])
            state["deltas"][rnd] = torch.frombuffer(bytearray(delta), dtype=torch.uint8)
            state["delta_sizes"][rnd] = broadcast = len(delta)
            prune(state["deltas"], (2 if self.beta else 1) * (wire.HEADER.size + 4 * state["num_weights"]))
        return Outcome(
            lam=lam,
            upload_bytes=sum(len(uploads[k][0]) for k in uploads),
            broadcast_bytes=broadcast,
            entropy_bound_bits=sum(aggregate.cross_entropy_bits(m, sent) for m in masks),
            mask_entropy=aggregate.binary_entropy_bits(new),
        )

    def state_schema(self, expect: schema.Expect) -> schema.Node:
        """The base state, and what the server knows of each client (`synced`: the round whose global state
        it holds, null: unknown, at most the round before the last), every round's delta size and the
        newest deltas (`prune`), the velocity with server momentum."""
        n, k, last = expect.num_weights, self.cfg.partition.num_clients, expect.round
        base = super().state_schema(expect)
        before = None if last is None else last - 1
        held = schema.Opt(expect.rounds(before))
        fields = {**base.fields,
                  "synced": schema.List(held, k, what=f"a list of {k} rounds or nulls, one per client"),
                  "delta_sizes": schema.IntKeys(schema.Int(1, last), schema.Int(wire.HEADER.size + 1),
                                                what="a table of each round's delta size"),
                  "deltas": schema.IntKeys(schema.Int(1, last), schema.Tensor(torch.uint8, (None,)),
                                           what="a table of the newest rounds' deltas")}  # fmt: skip
        if self.beta:
            fields["velocity"] = schema.Tensor(torch.float32, (n,), what=f"the server velocity: {n:,} finite float32 "
                                               "values (was it written without train.server_momentum?)")  # fmt: skip
        return schema.Each(schema.Table(fields, what=base.expected), lambda state, path: self._check_deltas(
            state, path, expect))  # fmt: skip

    def _check_deltas(self, state: dict, path: str, expect: schema.Expect) -> None:
        """Every round has its delta size; the deltas kept are the newest whose bytes fit in a full state
        (what `prune` keeps, so that `plan` finds every delta it sends), each the broadcast of its round."""
        sizes, deltas, last = state["delta_sizes"], state["deltas"], expect.round
        rounds = sorted(sizes)
        if self.levels and rounds:
            schema.fail(schema.join(path, "delta_sizes"), "no delta sizes (the broadcast is quantized)",
                        got=f"rounds {rounds[:6]}{'...' if len(rounds) > 6 else ''}")  # fmt: skip
        if last is not None and not self.levels and rounds != list(range(1, last + 1)):
            schema.fail(schema.join(path, "delta_sizes"), f"the delta sizes of rounds 1..{last}",
                        got=f"rounds {rounds[:6]}{'...' if len(rounds) > 6 else ''}")  # fmt: skip
        bound, kept, total = (2 if self.beta else 1) * (wire.HEADER.size + 4 * state["num_weights"]), [], 0
        for r in sorted(sizes, reverse=True):
            if total + sizes[r] > bound:
                break
            total += sizes[r]
            kept.append(r)
        if sorted(deltas) != sorted(kept):
            schema.fail(schema.join(path, "deltas"), f"the deltas of rounds {sorted(kept)} (the newest that fit in "
                        "a full state)", got=f"rounds {sorted(deltas)[:6]}")  # fmt: skip
        for r, delta in deltas.items():
            where = schema.join(schema.join(path, "deltas"), r)
            if delta.numel() != sizes[r]:
                schema.fail(where, f"{sizes[r]:,} bytes (its delta size)", got=f"{delta.numel():,} bytes")
            try:
                msg = wire.parse(delta.numpy().tobytes(), table_hash=state["table_hash"],
                                 num_weights=state["num_weights"])  # fmt: skip
                wire.expect(msg, kind=wire.KIND_DELTA, coders=tuple(wire.CODERS), round_=r, client=wire.SERVER)
            except wire.WireError as exc:
                schema.fail(where, f"the broadcast delta of round {r}", got=f"a message that is not: {exc}")

    def client_fields(self, expect: schema.Expect) -> dict[str, schema.Node]:
        """A client's replica of the global state (scores, and the velocity with server momentum), which every
        client holds (`init_client`; a checkpoint keeps each round's once, under `replicas`), none with the
        quantized broadcast; no own scores."""
        if self.levels:  # the quantized broadcast: a client keeps nothing between rounds
            return {"replica": schema.Null(), "own": schema.Null()}
        size = (2 if self.beta else 1) * expect.num_weights
        what = f"a replica of the global state: {size:,} finite float32 values"
        return {"replica": schema.Tensor(torch.float32, (size,), what=what), "own": schema.Null()}

    def client_lost(self, state: dict, k: int) -> None:
        state["synced"][k] = None

    def clients_restarted(self, state: dict) -> None:
        state["synced"] = [None] * len(state["synced"])

    def final_model(self, state: dict, rounds: int, info: dict) -> PrismModel:
        return masked_final_model(self.cfg, self.spec, state, rounds, info)
