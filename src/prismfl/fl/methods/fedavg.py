"""FedAvg on the same generator with ordinary float weights: clients train them locally, the server
averages them weighted by client size. Every upload and broadcast is the float32 weights (32 bits
per weight plus the 36-byte header); the model is model.pt (safetensors).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from prismfl import modelfile
from prismfl.capabilities import METHODS
from prismfl.fl import wire
from prismfl.fl.client import ClientContext, ClientRuntime, train_round
from prismfl.fl.methods.base import Downlink, Method, Outcome, Plan, Upload
from prismfl.fl.selection import select_clients
from prismfl.model import masked
from prismfl.model.build import build_model


class FedAvg(Method):
    caps = METHODS["fedavg"]
    STATE = {"weights": "weights"}

    def build_model(self, device: str = "cpu") -> torch.nn.Module:
        return masked.make_dense(build_model(self.cfg, device), self.cfg.seed)

    def client_round(self, ctx: ClientContext, client: ClientRuntime, down: Downlink) -> Upload:
        (data,) = down.messages
        held, weights = wire.decode_state(data, num_weights=ctx.num_weights, table_hash=ctx.table_hash)
        if held != down.round - 1:
            raise wire.UnexpectedMessage(f"expected the weights of round {down.round - 1}, got round {held}")
        t0 = time.perf_counter()
        result = train_round(ctx, client, weights, round_=down.round, steps=down.steps, lr=self.cfg.train.dense_lr)
        return self._upload_floats(ctx, client.k, result.scores, down.round, result, t0)

    def init_state(self, num_weights: int, table_hash: int) -> dict:
        weights = masked.get_trainable(self.build_model())
        return {"num_weights": num_weights, "table_hash": table_hash, "weights": weights}

    def plan(self, state: dict, rnd: int) -> Plan:
        chosen = select_clients(self.cfg, rnd)
        full = wire.encode_state(state["weights"], round_=rnd - 1, table_hash=state["table_hash"])
        downlinks = {k: Downlink(rnd, [full], self.cfg.train.local_steps) for k in chosen}
        return Plan(chosen, downlinks, len(full) * len(chosen))

    def decode(self, state: dict, rnd: int, k: int, data: bytes) -> torch.Tensor:
        return self._decode_floats(state, rnd, k, data)

    def aggregate(self, state: dict, rnd: int, uploads: dict[int, tuple[bytes, torch.Tensor]],
                  sizes: list[int]) -> Outcome:  # fmt: skip
        used = sorted(uploads)
        w = np.asarray(sizes, dtype=np.float64)[used]
        state["weights"] = sum(float(wk / w.sum()) * uploads[k][1] for wk, k in zip(w, used))
        up = sum(len(uploads[k][0]) for k in used)
        return Outcome(lam=None, upload_bytes=up, broadcast_bytes=wire.HEADER.size + 4 * state["num_weights"],
                       entropy_bound_bits=0.0, mask_entropy=0.0)  # fmt: skip

    def _net(self, state: dict) -> torch.nn.Module:
        return modelfile.dense_generator(self.spec, state["weights"])

    def final_model(self, state: dict, rounds: int, info: dict):
        from prismfl.errors import PrismError

        raise PrismError("a fedavg run's model is float weights (model.pt), not a mask model; "
                         "evaluate the run directory or its model.pt")  # fmt: skip

    def sample_images(self, state: dict, n: int = 64) -> torch.Tensor:
        return modelfile.sample(self._net(state), n, 0)

    def nets(self, state: dict) -> list[torch.nn.Module]:
        return [self._net(state)]

    def export(self, state: dict, out: Path, rounds: int, info: dict) -> str:
        size = modelfile.save_dense(out / self.caps.model, self.spec, state["weights"], self.cfg.data.dataset)
        return f"{out / self.caps.model} ({size:,} bytes)"
