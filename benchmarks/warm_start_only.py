"""The warm start alone: the model file of a run's round-0 scores (train.warm_start, trained at the server
on the clients' pooled statistics or on the public hold-out), without any round, so that a table can show
what the mask rounds add beside it.

Run: .venv/bin/python benchmarks/warm_start_only.py --config configs/fmnist-noniid.toml --out warm.prism
     [--set seed=1]; then .venv/bin/prismfl evaluate warm.prism --synthetic 10000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prismfl import modelfile
from prismfl.config import load_config
from prismfl.errors import PrismError
from prismfl.fl import engine, simulate, wire
from prismfl.fl.methods.base import masked_final_model
from prismfl.fl.methods.registry import build


def warm_start_model(cfg, log=print) -> modelfile.PrismModel:
    """Set the clients up as a run does (statistics, pooled statistics, warm start) and export the round-0
    scores as the run would export its final ones."""
    if not cfg.train.warm_start or cfg.train.method != "prism":
        raise PrismError("the warm start alone needs train.warm_start > 0 and train.method = 'prism'")
    method = build(cfg)
    setup = simulate.InProcess(cfg).setup(method, None, log)
    _, scores = wire.decode_state(setup.warm_start, num_weights=setup.num_weights, table_hash=setup.table_hash)
    state = {"scores": scores}
    if method.spec.num_classes:
        state["class_shares"] = engine.class_shares(setup.class_counts, method.spec.codes)
    info = {"method": "warm start alone", "warm_start": {k: v for k, v in setup.warm_info.items() if k != "seconds"}}
    return masked_final_model(cfg, method.spec, state, 0, info)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], help="override a config key: --set seed=1")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    model = warm_start_model(load_config(a.config, a.set))
    size = modelfile.save(model, a.out)
    print(f"wrote {a.out} ({size:,} bytes): the warm start alone")


if __name__ == "__main__":
    main()
