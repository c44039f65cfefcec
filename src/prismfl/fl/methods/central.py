"""Central training, the upper bound: one PRISM model trained on all clients' data pooled, for as many
steps as the round's clients take together in the federation. Client 0 stands for the pooled data
(on Flower: the node with partition-id 0 computes the pooled statistics); nothing is communicated.
"""

from __future__ import annotations

import numpy as np
import torch

from prismfl.capabilities import METHODS
from prismfl.fl import aggregate
from prismfl.fl.client import ClientContext
from prismfl.fl.methods.base import Downlink, Outcome, Plan, masked_final_model
from prismfl.fl.methods.local import OwnScores
from prismfl.fl.selection import select_clients
from prismfl.model.build import initial_scores


class Central(OwnScores):
    caps = METHODS["central"]
    STATE = {"scores": "weights"}

    def holds_data(self, k: int) -> bool:
        return k == 0

    def client_indices(self, ctx: ClientContext, k: int):
        return np.sort(np.concatenate(ctx.fed.parts))

    def init_state(self, num_weights: int, table_hash: int) -> dict:
        return {"num_weights": num_weights, "table_hash": table_hash,
                "scores": initial_scores(self.cfg, num_weights)}  # fmt: skip

    def plan(self, state: dict, rnd: int) -> Plan:
        chosen = select_clients(self.cfg, rnd)
        return Plan(chosen, {0: Downlink(rnd, [], self.cfg.train.local_steps * len(chosen))}, 0)

    def aggregate(self, state: dict, rnd: int, uploads: dict[int, tuple[bytes, torch.Tensor]],
                  sizes: list[int]) -> Outcome:  # fmt: skip
        state["scores"] = uploads[0][1]
        return Outcome(None, 0, 0, 0.0, aggregate.binary_entropy_bits(state["scores"]))

    def final_model(self, state: dict, rounds: int, info: dict):
        return masked_final_model(self.cfg, self.spec, state, rounds, info)


class PublicOnly(Central):
    """The reference that reads no private data: Central's training on the public hold-out (the images
    the public feature net learns from, which no client holds) instead of the clients' pooled data.
    A federated or private model is worth its privacy cost only where it beats this."""

    caps = METHODS["public"]

    def client_indices(self, ctx: ClientContext, k: int):
        return np.sort(ctx.fed.public_idx)
