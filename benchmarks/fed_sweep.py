"""Federated variants of the demo, trained side by side and scored the same way.

Each variant is configs/fmnist-public.toml plus overrides; its final exported model is scored by
the domain classifier (domain FID of --samples samples vs as many test images, confident share,
class histogram). Results are appended to --out as they finish, so the sweep can be stopped and
rerun (finished variants are skipped).

With --seeds 0,1,2 every variant runs once per seed (results keyed "variant@seed"); --grids DIR
keeps each final model's sample grid.

Run: .venv/bin/python benchmarks/fed_sweep.py --out docs/benchmarks/fed_sweep.json [--only a,b]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from datetime import date
from pathlib import Path

import torch

from prismfl import modelfile, rundir
from prismfl.config import load_config
from prismfl.eval.evaluate import score_images
from prismfl.fl import simulate
from prismfl.plots import save_grid
from prismfl.progress import set_enabled

VARIANTS = {
    "demo": [],
    "demo before issue 12": ["model.arch=mlp", "loss.feature_width=16", "loss.class_term=false"],
    "mada off": ["train.mada=false"],
    "5 of 10 clients, 24 rounds": ["train.client_fraction=0.5", "train.rounds=24"],
    "10 of 10 clients, 12 rounds": ["train.client_fraction=1.0", "train.rounds=12"],
    "20 local steps, 150 rounds": ["train.local_steps=20", "train.rounds=150"],
    "100 local steps, 30 rounds": ["train.local_steps=100", "train.rounds=30"],
    "lr 0.03": ["train.lr=0.03"],
    "tracker none": ["loss.tracker=none"],
    "moment second": ["loss.moment=second"],
    "dcgan-64": ["model.arch=dcgan", "model.width=64"],
    "lr 0.2": ["train.lr=0.2"],
    "25 local steps x 48 rounds": ["train.local_steps=25", "train.rounds=48"],
    "200 local steps x 6 rounds": ["train.local_steps=200", "train.rounds=6"],
    "mlp-1024": ["model.width=1024"],
    "stratified": ["train.upload_sampling=stratified"],
    "class term": ["loss.class_term=true"],
    "features 32": ["loss.feature_width=32"],
    "features 32 + stratified": ["loss.feature_width=32", "train.upload_sampling=stratified"],
    "features 32 + class term": ["loss.feature_width=32", "loss.class_term=true"],
    "mlp-up + features 32 + class term": ["model.arch=mlp-up", "loss.feature_width=32", "loss.class_term=true"],
    "features 32 + class term + stratified": [
        "loss.feature_width=32",
        "loss.class_term=true",
        "train.upload_sampling=stratified",
    ],
}


PINNED = [
    "model.modes=1",
    "loss.codes_per_step=0",
    "model.conditional=false",
    "train.rounds=12",
    "train.server_momentum=0.0",
    'loss.feature_training="plain"',
    "train.warm_start=0",
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/fmnist-public.toml")
    p.add_argument("--only", default="")
    p.add_argument("--set", action="append", default=[], help="override applied to every variant")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--runs", default="runs/sweep")
    p.add_argument("--out", default="docs/benchmarks/fed_sweep.json")
    p.add_argument("--seeds", default="", help="comma-separated seeds: each variant once per seed")
    p.add_argument("--grids", default="", help="folder for each final model's sample grid")
    a = p.parse_args()
    set_enabled(False)
    out = Path(a.out)
    done = json.loads(out.read_text()) if out.exists() else {"results": {}}
    names = a.only.split(",") if a.only else list(VARIANTS)
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [None]
    for variant, seed in [(n, s) for n in names for s in seeds]:
        name = variant if seed is None else f"{variant}@{seed}"
        if name in done["results"]:
            continue
        seeded = [] if seed is None else [f"seed={seed}"]
        # issue 12's sweep is of the unconditional demo (class-conditional since issue 15: benchmarks/conditional.py)
        cfg = load_config(
            a.config,
            # as measured: 12 rounds, no server momentum (the demo's defaults since)
            [*PINNED, *a.set, *VARIANTS[variant], *seeded, "train.sample_every=0"],
        )
        run = Path(a.runs) / name.replace(" ", "_").replace(",", "")
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        simulate.train(cfg, run, log=lambda *_: None)
        wall = time.perf_counter() - t0
        model = modelfile.load(run / rundir.MODEL)
        images = modelfile.sample(modelfile.materialize(model), a.samples, seed=0)
        s = score_images(images, cfg.data.dataset, n_real=a.samples)
        if a.grids:
            save_grid(images[:100], Path(a.grids) / f"{run.name}.png", nrow=10)
        records = rundir.read_metrics(run)
        done["results"][name] = {
            "overrides": VARIANTS[variant] + seeded, "wall_seconds": round(wall, 1),
            "train_seconds": round(sum(r["seconds"] for r in records), 1),
            "client_steps": sum(len(r["clients"]) for r in records) * cfg.train.local_steps,
            "domain_fid": round(s["domain_fid"], 1), "confident_share": round(s["confident_share"], 3),
            "class_kl": round(s["class_kl"], 3), "min_class_share": round(s["min_class_share"], 4),
            "class_histogram": s["class_histogram"], "final_start_loss": records[-1]["start_loss"],
            "upload_MB": round(sum(r["upload_bytes"] for r in records) / 1e6, 2),
        }  # fmt: skip
        done.update({"date": date.today().isoformat(), "config": a.config, "common_overrides": a.set,
                     "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                     "protocol": s["protocol"]})  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(done, indent=1))
        r = done["results"][name]
        print(f"{name:<32} FID {r['domain_fid']:7.1f}  confident {r['confident_share']:.2f}  "
              f"{r['train_seconds']:6.0f}s  {r['class_histogram']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
