"""Local training: every client trains its own PRISM model on its own data and never communicates.

Each round a client reports its scores to the run directory (so that the run can be checkpointed,
exported and evaluated); that report is not part of the method and is counted as 0 bytes. The
models are models/client-K.prism.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from prismfl import modelfile, schema
from prismfl.capabilities import METHODS
from prismfl.fl import aggregate
from prismfl.fl.client import ClientContext, ClientRuntime, train_round
from prismfl.fl.methods.base import Downlink, Method, Outcome, Plan, Upload, masked_final_model
from prismfl.fl.selection import select_clients
from prismfl.model.build import initial_scores


class OwnScores(Method):
    """A method whose clients train scores of their own and report them (local, central)."""

    def init_client(self, ctx: ClientContext, client: ClientRuntime) -> None:
        if client.stats is not None:
            client.own = initial_scores(self.cfg, ctx.num_weights)

    def client_round(self, ctx: ClientContext, client: ClientRuntime, down: Downlink) -> Upload:
        t0 = time.perf_counter()
        result = train_round(ctx, client, client.own, round_=down.round, steps=down.steps)
        client.own = result.scores.cpu()
        return self._upload_floats(ctx, client.k, client.own, down.round, result, t0)

    def decode(self, state: dict, rnd: int, k: int, data: bytes) -> torch.Tensor:
        return self._decode_floats(state, rnd, k, data)

    def client_fields(self, expect: schema.Expect) -> dict[str, schema.Node]:
        """Its own scores (`init_client`), which every client that holds data trains; no replica."""
        n = expect.num_weights
        own = schema.Tensor(torch.float32, (n,), what=f"its own scores: {n:,} finite float32 values")
        return {"replica": schema.Null(), "own": own}


class Local(OwnScores):
    caps = METHODS["local"]
    STATE = {"params": "weights list"}
    own_class_shares = True  # a conditional client's model draws the classes (and modes) it holds

    def init_state(self, num_weights: int, table_hash: int) -> dict:
        scores = initial_scores(self.cfg, num_weights)
        return {"num_weights": num_weights, "table_hash": table_hash,
                "params": [scores.clone() for _ in range(self.cfg.partition.num_clients)]}  # fmt: skip

    def plan(self, state: dict, rnd: int) -> Plan:
        chosen = select_clients(self.cfg, rnd)
        return Plan(chosen, {k: Downlink(rnd, [], self.cfg.train.local_steps) for k in chosen}, 0)

    def aggregate(self, state: dict, rnd: int, uploads: dict[int, tuple[bytes, torch.Tensor]],
                  sizes: list[int]) -> Outcome:  # fmt: skip
        for k, (_, scores) in uploads.items():
            state["params"][k] = scores
        return Outcome(None, 0, 0, 0.0, aggregate.binary_entropy_bits(state["params"][0]))

    def final_model(self, state: dict, rounds: int, info: dict, k: int = 0):
        own = {"scores": state["params"][k], **({"class_shares": state["client_shares"][k]} if self.spec.num_classes
                                                else {})}  # fmt: skip
        return masked_final_model(self.cfg, self.spec, own, rounds, {**info, "client": k})

    def _models(self, state: dict, rounds: int = 0, info: dict | None = None):
        return [self.final_model(state, rounds, info or {}, k) for k in range(len(state["params"]))]

    def nets(self, state: dict) -> list[torch.nn.Module]:
        return [modelfile.materialize(m) for m in self._models(state)]

    def sample_images(self, state: dict, n: int = 64) -> torch.Tensor:
        """Eight images of every client's model, a row each."""
        return torch.cat([modelfile.sample(net, 8, seed=0) for net in self.nets(state)])

    def export(self, state: dict, out: Path, rounds: int, info: dict) -> str:
        for k, model in enumerate(self._models(state, rounds, info)):
            modelfile.save(model, out / self.caps.model.format(k=k))
        return f"{len(state['params'])} models in {(out / self.caps.model).parent}"
