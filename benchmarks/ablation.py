"""Which loss, estimator and sizes learn fastest? Centralised training curves, variant by variant.

Each variant trains the demo's generator on all private FashionMNIST training images as one
client (no federation, so only the local learning problem is compared) and is scored every
`--every` steps: the domain FID of 2,000 samples from the exported (most likely) mask against 2,000 test images,
and the share of samples the domain classifier labels with confidence.

Run: .venv/bin/python benchmarks/ablation.py --steps 1500 --every 500 --out docs/benchmarks/ablation.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch

from prismfl import modelfile
from prismfl.config import load_config
from prismfl.eval.classifier import PROTOCOL
from prismfl.eval.evaluate import score_images
from prismfl.fl import task
from prismfl.fl.client import ClientState, LocalConfig, local_train
from prismfl.fl.methods.base import masked_final_model
from prismfl.loss.matching import feature_stats
from prismfl.model import masked
from prismfl.plots import save_grid

VARIANTS = {
    "default": [],
    "estimator=scaled": ["model.estimator=scaled"],
    "features=random": ["loss.features=random"],
    "normalize=none": ["loss.normalize=none"],
    "normalize=dim": ["loss.normalize=dim"],
    "tracker=none": ["loss.tracker=none"],
    "tracker=adam": ["loss.tracker=adam"],
    "moment=second": ["loss.moment=second"],
    "lr=0.03": ["train.lr=0.03"],
    "batch=32": ["train.batch_size=32"],
    "width=256": ["model.width=256"],
    "arch=dcgan": ["model.arch=dcgan", "model.width=64"],
    "class_term": ["loss.class_term=true"],
    "arch=dcgan+class_term": ["model.arch=dcgan", "model.width=64", "loss.class_term=true"],
    "covariance": ["loss.covariance=true"],
    "arch=mlp-up": ["model.arch=mlp-up"],
    "arch=mlp-up+feature_width=32+class_term": ["model.arch=mlp-up", "loss.feature_width=32", "loss.class_term=true"],
    "batch=64": ["train.batch_size=64"],
    "feature_width=32": ["loss.feature_width=32"],
    "width=1024": ["model.width=1024"],
    "feature_width=64": ["loss.feature_width=64"],
    "feature_width=32+arch=dcgan": ["loss.feature_width=32", "model.arch=dcgan", "model.width=64"],
    "feature_width=32+covariance": ["loss.feature_width=32", "loss.covariance=true"],
    "feature_width=32+class_term": ["loss.feature_width=32", "loss.class_term=true"],
    "z_dim=16": ["model.z_dim=16"],
    "arch=dcgan+covariance": ["model.arch=dcgan", "model.width=64", "loss.covariance=true"],
    "arch=dcgan+width=128": ["model.arch=dcgan", "model.width=128"],
}


def central_curve(overrides: list[str], steps: int, every: int, config: str, grid: str = "") -> list[dict]:
    # issue 12's central ablation is of the unconditional generator (the demo is conditional since issue 15),
    # from the demo's settings as they were when it ran (MLP, plain width-16 feature net, no class term)
    as_measured = ["model.modes=1", "loss.codes_per_step=0", "model.conditional=false", "model.arch=mlp",
                   "loss.feature_width=16", "loss.class_term=false", 'loss.feature_training="plain"',
                   "train.warm_start=0"]  # fmt: skip
    cfg = load_config(config, [*as_measured, *overrides, "partition.num_clients=1", "partition.scheme=iid"])
    fed = task.prepare_federation(cfg)
    net, _, _ = task.build_feature_net(cfg, fed)
    model = task.build_model(cfg)
    loss = task.client_loss(cfg, feature_stats(net.extract, fed.client_images(0)))
    scores = task.initial_scores(cfg, masked.num_maskable(model))
    state, gen = ClientState(), task.generator_for(cfg.seed, "central")
    local = LocalConfig(every, cfg.train.batch_size, cfg.train.lr)
    curve, train_seconds = [], 0.0
    for done in range(every, steps + 1, every):
        t0 = time.perf_counter()
        result = local_train(model, scores, loss, net.extract, state=state, cfg=local, generator=gen)
        train_seconds += time.perf_counter() - t0
        scores = result.scores
        final = masked_final_model(cfg, task.arch_spec(cfg), scores, 0, {})  # as the exported model
        images = modelfile.sample(modelfile.materialize(final), 2000)
        if grid:
            save_grid(images[:100], f"{grid}-{done}.png", nrow=10)
        s = score_images(images, cfg.data.dataset, n_real=2000)
        curve.append({"steps": done, "train_seconds": round(train_seconds, 1), "loss": result.loss,
                      "domain_fid": s["domain_fid"], "confident_share": s["confident_share"],
                      "class_histogram": s["class_histogram"]})  # fmt: skip
        print(f"  {done:>5} steps  {train_seconds:6.0f}s  loss {result.loss:.4f}  "
              f"domain FID {s['domain_fid']:7.1f}  confident {s['confident_share']:.2f}", flush=True)  # fmt: skip
    return curve


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--variants", default=",".join(VARIANTS), help="names from VARIANTS, separated by ','")
    p.add_argument("--config", default="configs/fmnist-public.toml")
    p.add_argument("--out", default="")
    p.add_argument("--grids", default="", help="folder for a sample grid per variant and checkpoint")
    a = p.parse_args()
    results = {}
    for name in a.variants.split(","):
        print(name, flush=True)
        grid = f"{a.grids}/{name.replace('=', '-')}" if a.grids else ""
        results[name] = central_curve(VARIANTS[name], a.steps, a.every, a.config, grid)
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"date": date.today().isoformat(), "command": "benchmarks/ablation.py " + " ".join(
                    f"--{k} {v}" for k, v in vars(a).items() if k != "out"),
                    "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                    "protocol": PROTOCOL, "variants": {k: VARIANTS[k] for k in results},
                    "results": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
