"""Milliseconds per local step for each architecture, aggregation time, and round time vs client time.

Run: .venv/bin/python benchmarks/steps.py [--steps 30] [--out docs/benchmarks/steps.json]
Everything is measured in this one process, side by side, on synthetic images (the step cost does
not depend on the pixels), so the ratios hold even on a noisy shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch

from prismfl.config import load_config
from prismfl.fl import aggregate, task
from prismfl.fl.client import ClientState, LocalConfig, local_train
from prismfl.loss.features import SmallCNN, freeze
from prismfl.loss.matching import feature_stats
from prismfl.model import masked

ARCHS = {
    "mlp-512 (demo default), 28x28": ["model.arch=mlp", "model.width=512", "model.z_dim=64"],
    "dcgan-64, 28x28": ["model.arch=dcgan", "model.width=64", "model.z_dim=64"],
    "resnet-64 (paper), 32x32": ["model.arch=resnet", "model.width=64", "model.z_dim=128", "data.resize=32"],
}


def time_steps(overrides: list[str], steps: int, batch: int) -> dict:
    cfg = load_config("configs/fmnist-noniid.toml", overrides + [f"train.batch_size={batch}"])
    size = cfg.data.resize or 28
    net = freeze(SmallCNN(1, cfg.loss.feature_width))
    images = torch.rand(512, 1, size, size) * 2 - 1
    loss = task.client_loss(cfg, feature_stats(net.extract, images))
    model = task.build_model(cfg)
    n = masked.num_maskable(model)
    scores = task.initial_scores(cfg, n)
    state, gen = ClientState(), torch.Generator().manual_seed(0)
    local_train(model, scores, loss, net.extract, state=state, cfg=LocalConfig(2, batch), generator=gen)  # warm-up
    t0 = time.perf_counter()
    local_train(model, scores, loss, net.extract, state=state, cfg=LocalConfig(steps, batch), generator=gen)
    return {"maskable_weights": n, "ms_per_step": 1000 * (time.perf_counter() - t0) / steps}


def time_aggregation(n: int, clients: int = 10, repeats: int = 5) -> float:
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand(n, generator=gen) < 0.5 for _ in range(clients)]
    scores = torch.randn(n, generator=gen)
    t0 = time.perf_counter()
    for _ in range(repeats):
        counts = aggregate.count_masks(masks)
        proposal = aggregate.aggregate_scores(counts, len(masks))
        aggregate.blend(scores, proposal, aggregate.mada_lambda(scores, proposal, gen))
    return 1000 * (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.manual_seed(0)
    rows = {}
    for name, ov in ARCHS.items():
        r = time_steps(ov, a.steps, a.batch)
        r["aggregate_10_clients_ms"] = time_aggregation(r["maskable_weights"])
        rows[name] = r
        print(f"{name:<34} {r['maskable_weights']:>10,} weights  {r['ms_per_step']:8.1f} ms/step  "
              f"aggregate+MADA of 10 masks {r['aggregate_10_clients_ms']:7.1f} ms", flush=True)  # fmt: skip
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "batch": a.batch,
        "steps": a.steps,
        "rows": rows,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
