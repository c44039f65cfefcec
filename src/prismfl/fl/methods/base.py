"""The Method interface: what a federated method is, apart from how rounds are driven and messages move.

A method knows (like a Flower Strategy, with FLSim's split of server from trainer):
- server side: its global state (`init_state`), whom a round contacts and with which messages
  (`plan`), how an upload is decoded and checked (`decode`), how uploads become the next global
  state (`aggregate`), and what the run exports (`final_model`, `export`, `sample_images`);
- client side: what a client does with a round's messages (`client_round`), and how it turns its
  images into the statistics its loss matches (`release`; the privacy wrapper replaces it).
The engine (fl/engine.py) drives rounds, resume, records and checkpoints for every method; the
transports (fl/simulate.py in-process, flower/ over a Flower Grid) only move the bytes.

Global state is a plain tree of tensors, numbers and lists (safestate), checkpointed as it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prismfl import modelfile, schema
from prismfl.capabilities import Capabilities
from prismfl.config import RunConfig
from prismfl.describe import describe
from prismfl.errors import PrismError
from prismfl.fl import wire
from prismfl.fl.client import ClientContext, ClientRuntime, exact_stats
from prismfl.loss.matching import FeatureStats
from prismfl.model.build import build_model
from prismfl.modelfile import PrismModel


@dataclass
class Downlink:
    """What the server sends one client in a round."""

    round: int
    messages: list[bytes]  # wire messages, applied in order
    steps: int  # local steps to take
    check: int | None = None  # CRC-32 of the replica the client must hold after the messages


@dataclass
class Upload:
    """What one client sends back."""

    data: bytes  # one wire message
    loss: float
    start_loss: float
    seconds: float  # local training time


@dataclass
class Plan:
    clients: list[int]  # the round's clients, as recorded
    downlinks: dict[int, Downlink]  # whom the server contacts, and with what
    download_bytes: int  # bytes the method counts as sent down


@dataclass
class Outcome:
    lam: float | None
    upload_bytes: int  # bytes the method counts as sent up
    broadcast_bytes: int
    entropy_bound_bits: float
    mask_entropy: float
    rejected: list[dict] = field(default_factory=list)  # uploads a robust rule left out: {"client", "why"}


def scores_crc(values: torch.Tensor) -> int:
    """CRC-32 of float32 values: server and client check that their replicas agree bit for bit."""
    import zlib

    return zlib.crc32(values.detach().cpu().to(torch.float32).numpy().tobytes())


class Method:
    """Defaults shared by the masked methods; each method overrides what differs."""

    caps: Capabilities  # what it supports and where it writes its model (prismfl/capabilities.py METHODS)

    @property
    def name(self) -> str:
        return self.caps.name

    @property
    def communicates(self) -> bool:
        """False: nothing the method needs travels (local, central, public)."""
        return self.caps.communicates

    @property
    def warm_starts(self) -> bool:
        """train.warm_start applies (prism); the baselines ignore it."""
        return self.caps.warm_start

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.spec = cfg.arch_spec()

    # ---- both sides

    def build_model(self, device: str = "cpu") -> torch.nn.Module:
        return build_model(self.cfg, device)

    # ---- client side

    def holds_data(self, k: int) -> bool:
        return True

    def client_indices(self, ctx: ClientContext, k: int):
        """Which training images client k holds."""
        return ctx.fed.parts[k]

    def client_data(self, ctx: ClientContext, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Client k's images, and their labels when the model is class-conditional (else None)."""
        idx = self.client_indices(ctx, k)
        return ctx.fed.images(idx), ctx.fed.labels(idx) if self.spec.num_classes else None

    def release(self, ctx: ClientContext, images: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[FeatureStats, dict | None, dict | None]:  # fmt: skip
        """The client's feature statistics, per class with `labels` (exact; `privacy.Private` releases
        them with DP instead), the release's parameters (privacy only) and what it shares for pooling
        (privacy.pool > 0 only: its noisy sums)."""
        return exact_stats(ctx, images, labels, self.spec.codes), None, None

    def init_client(self, ctx: ClientContext, client: ClientRuntime) -> None:
        """Round-0 state of a new client (every client derives it from the run seed: 0 bytes)."""

    def client_round(self, ctx: ClientContext, client: ClientRuntime, down: Downlink) -> Upload:
        raise NotImplementedError

    def received_scores(self, ctx: ClientContext, down: Downlink) -> torch.Tensor | None:
        """The global scores a round's downlink alone gives a client that keeps no replica (None: the
        method's clients keep one, or need none)."""
        return None

    # ---- server side

    def init_state(self, num_weights: int, table_hash: int) -> dict:
        raise NotImplementedError

    def plan(self, state: dict, rnd: int) -> Plan:
        raise NotImplementedError

    def decode(self, state: dict, rnd: int, k: int, data: bytes):
        """Client k's decoded upload for round rnd; a WireError for anything that must not be accepted."""
        raise NotImplementedError

    def aggregate(self, state: dict, rnd: int, uploads: dict[int, tuple[bytes, object]],
                  sizes: list[int]) -> Outcome:  # fmt: skip
        """Fold the round's decoded uploads (by client) into `state`, in place."""
        raise NotImplementedError

    STATE: dict[str, str] = {}  # the global state's tensors: "weights" (N float32) or "weights list" (one per client)

    def state_schema(self, expect: schema.Expect) -> schema.Node:
        """The global state this method writes (init_state, aggregate), as schema nodes, for a model of
        `expect.num_weights` weights and layer-table hash `expect.table_hash` after round `expect.round`."""
        n, k = expect.num_weights, self.cfg.partition.num_clients
        weights = schema.Tensor(torch.float32, (n,), what=f"{n:,} finite float32 values (a float32 tensor)")
        table_hash = schema.TABLE_HASH if expect.table_hash is None else \
            schema.Const(expect.table_hash, what=f"{expect.table_hash} (this model's layer-table hash)")  # fmt: skip
        fields = {"num_weights": schema.Const(n, what=f"{n:,} (the number of weights of this model)"),
                  "table_hash": table_hash}  # fmt: skip
        per_client = schema.List(weights, k, what=f"a list of {k} weight tensors, one per client")
        for key, kind in self.STATE.items():
            fields[key] = weights if kind == "weights" else per_client
        if self.spec.num_classes:
            shares = schema.Each(schema.Tensor(torch.float64, (self.spec.codes,)), class_shares)
            fields["class_shares"] = shares
            if self.own_class_shares:
                fields["client_shares"] = schema.List(shares, k, what=f"a list of {k} clients' class shares")
        return schema.Table(fields, what="a table (the method's global state)")

    def check_state(self, state: dict, num_weights: int, table_hash: int | None = None,
                    round_: int | None = None) -> None:  # fmt: skip
        """A global state read from a checkpoint holds what this method needs, for a model of N weights (and
        this layer-table hash, after this round, where given); a StateError naming the first field that
        does not fit otherwise (a crafted or damaged checkpoint must not reach the round loop)."""
        expect = schema.Expect(num_weights=num_weights, table_hash=table_hash,
                               num_clients=self.cfg.partition.num_clients, round=round_)  # fmt: skip
        schema.check(self.state_schema(expect), state, "checkpoint", "server")

    def client_fields(self, expect: schema.Expect) -> dict[str, schema.Node]:
        """What this method keeps in a client's state (ClientRuntime) besides the statistics, optimizer and
        trackers, as a checkpoint holds it: `replica` (held in the checkpoint's `replicas`) and `own`."""
        return {"replica": schema.Null(), "own": schema.Null()}

    own_class_shares = False  # True: a conditional model per client, each with its own class shares (local)

    def warm_start(self, state: dict, message: bytes) -> None:
        """train.warm_start: replace the round-0 global scores by the wire state `message`."""
        raise PrismError(f"method {self.name!r} has no global scores to warm-start")

    def client_lost(self, state: dict, k: int) -> None:
        """Client k failed this round: the server no longer knows what it holds."""

    def clients_restarted(self, state: dict) -> None:
        """Every client restarted from scratch (a Flower run resumed)."""

    def final_model(self, state: dict, rounds: int, info: dict) -> PrismModel:
        raise NotImplementedError

    def sample_images(self, state: dict, n: int = 64) -> torch.Tensor:
        """Images of the current model(s) with noise seed 0: the grids every `sample_every` rounds
        (a conditional model: n // 8 images of each class in turn, one row of 8 per class)."""
        net = modelfile.materialize(self.final_model(state, 0, {}))
        if self.spec.num_classes:
            return modelfile.sample_labelled(net, 0, 0, modelfile.per_class_labels(self.spec.num_classes, 8))[0]
        return modelfile.sample(net, n, 0)

    def nets(self, state: dict) -> list[torch.nn.Module]:
        """Ready-to-sample generators of the current state (the quick FID averages over them)."""
        return [modelfile.materialize(self.final_model(state, 0, {}))]

    def export(self, state: dict, out: Path, rounds: int, info: dict) -> str:
        """Write the run's model file(s); return what was written, for the log."""
        size = modelfile.save(self.final_model(state, rounds, info), out / self.caps.model)
        return f"{out / self.caps.model} ({size:,} bytes)"

    # ---- helpers for the methods whose uploads are float32 states (fedavg, local, central)

    def _decode_floats(self, state: dict, rnd: int, k: int, data: bytes) -> torch.Tensor:
        held, values = wire.decode_state(data, num_weights=state["num_weights"], table_hash=state["table_hash"],
                                         client=k)  # fmt: skip
        if held != rnd:
            raise wire.UnexpectedMessage(f"expected the state of round {rnd}, got round {held}")
        return values

    def _upload_floats(self, ctx: ClientContext, k: int, values: torch.Tensor, rnd: int, result, t0: float) -> Upload:
        data = wire.encode_state(values.cpu(), round_=rnd, table_hash=ctx.table_hash, client=k)
        return Upload(data, float(result.loss), float(result.start_loss), time.perf_counter() - t0)


def class_shares(shares: torch.Tensor, path: str) -> None:
    """A conditional model's class shares: finite, >= 0, summing to 1 (modelfile.check_class_shares)."""
    try:
        modelfile.check_class_shares(shares.tolist(), len(shares))
    except ValueError as exc:
        schema.fail(path, "class shares (finite, >= 0, summing to 1)", got=f"{describe(shares)}: {exc}")


def masked_final_model(cfg: RunConfig, spec, state: dict, rounds: int, info: dict) -> PrismModel:
    """The exported mask model of the state's scores: the most likely mask (keep a weight where its
    probability > 1/2); with the class shares of a conditional model."""
    mask = state["scores"].cpu() > 0
    full = {"dataset": cfg.data.dataset, "rounds": rounds, "clients": cfg.partition.num_clients,
            "partition": cfg.partition.scheme, **info}  # fmt: skip
    shares = state["class_shares"].tolist() if spec.num_classes else None
    return PrismModel(spec, mask, full, shares)
