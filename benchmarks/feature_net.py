"""How good a classifier is the loss's public feature net under each `loss.feature_training` recipe?

Trains the public feature net of a config on its public hold-out (the images no client holds) with
each recipe, exactly as `prismfl train` does (loss/feature_nets.py feature_training), and reports its accuracy on
the real test set, which the net never sees otherwise. Nothing is cached.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/feature_net.py [--config C] [--recipes plain,augmented]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from prismfl.config import load_config
from prismfl.configcheck import FEATURE_TRAINING
from prismfl.data import federation
from prismfl.data.sources import load_split, to_float
from prismfl.loss import feature_nets
from prismfl.supervised import predict


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/fmnist-public.toml")
    p.add_argument("--recipes", default=",".join(FEATURE_TRAINING))
    p.add_argument("--out", default="docs/benchmarks/quality/feature-net.json")
    a = p.parse_args()
    base = load_config(a.config)
    fed = federation.prepare_federation(base)
    if not len(fed.public_idx):
        raise SystemExit(f"{a.config}: no public hold-out (loss.features must be \"public\" and "
                         "partition.public_holdout > 0)")  # fmt: skip
    test = load_split(base.data.dataset, "test", base.data.root or None)
    test_images, test_labels = to_float(test.images, base.data.resize or None), torch.from_numpy(test.labels)
    rows = []
    for recipe in a.recipes.split(","):
        cfg = load_config(a.config, [f'loss.feature_training="{recipe}"'])
        args = feature_nets.feature_training(cfg)
        t0 = time.perf_counter()
        images, labels = feature_nets.public_feature_data(cfg, fed)[:2]
        net = feature_nets.train_public_net(cfg, images, labels, desc=f"public feature net ({recipe})")
        seconds = time.perf_counter() - t0
        accuracy = float((predict(net, test_images).argmax(1) == test_labels).float().mean())
        rows.append({"recipe": recipe, **args, "test_accuracy": round(accuracy, 4), "train_seconds": round(seconds, 1)})
        print(f"{recipe:10s} test accuracy {accuracy:.4f}  {seconds:.0f} s  {args}")
    record = {"command": "benchmarks/feature_net.py", "config": a.config, "public_images": len(fed.public_idx),
              "date": date.today().isoformat(),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "rows": rows}  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
