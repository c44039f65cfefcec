"""Cost per local step of the demo generator and loss variants of issue 12, timed interleaved in one
process (1 thread), so that load on a shared machine hits every variant alike; ratios to the first.

Run: .venv/bin/python benchmarks/quality_steps.py
"""

import time

import torch

from prismfl.config import load_config
from prismfl.fl import task
from prismfl.fl.client import ClientState, LocalConfig, local_train
from prismfl.loss.matching import feature_stats
from prismfl.model import masked


def main() -> None:
    torch.set_num_threads(1)
    V = {
        "mlp, features 16": ["model.arch=mlp", "loss.feature_width=16", "loss.class_term=false"],
        "mlp, features 32 + class term": ["model.arch=mlp", "loss.feature_width=32", "loss.class_term=true"],
        "mlp-up, features 16": ["model.arch=mlp-up", "loss.feature_width=16", "loss.class_term=false"],
        "mlp-up, features 32 + class term": ["model.arch=mlp-up", "loss.feature_width=32", "loss.class_term=true"],
    }
    setups = {}
    for name, ov in V.items():
        cfg = load_config("configs/fmnist-noniid.toml", ov + ["partition.num_clients=1", "partition.scheme=iid"])
        fed = task.prepare_federation(cfg)
        net, _, _ = task.build_feature_net(cfg, fed, log=lambda *a: None)
        model = task.build_model(cfg)
        loss = task.client_loss(cfg, feature_stats(net.extract, fed.client_images(0)[:2000]))
        setups[name] = (model, net, loss, task.initial_scores(cfg, masked.num_maskable(model)))
    times = {k: [] for k in V}
    for rep in range(3):  # interleaved, so that load changes hit every variant alike
        for name, (model, net, loss, scores) in setups.items():
            t = time.perf_counter()
            local_train(
                model,
                scores,
                loss,
                net.extract,
                state=ClientState(),
                cfg=LocalConfig(40, 32, 0.1),
                generator=torch.Generator().manual_seed(rep),
            )
            times[name].append((time.perf_counter() - t) / 40)
    base = min(times["mlp, features 16"])
    for name, ts in times.items():
        weights = masked.num_maskable(setups[name][0])
        print(f"{name:<36} {min(ts) * 1000:6.1f} ms/step  x{min(ts) / base:.2f}  ({weights:,} weights)")


if __name__ == "__main__":
    main()
