"""Hostile clients and lost uploads on the demo federation: domain FID with plain and robust aggregation.

Each cell is a run of configs/fmnist-public.toml with every one of the 10 clients in every round
(so that 10 / 20 / 30 % of a round are 1 / 2 / 3 clients), fewer rounds and local steps (a CPU
budget), and the faults of the cell, evaluated on 5,000 samples. Cells already evaluated are read
back, so an interrupted campaign resumes. Run:

    .venv/bin/python benchmarks/robustness.py --out runs/robustness --json docs/benchmarks/robustness.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

BASE = ["train.client_fraction=1.0", "train.rounds=8", "train.local_steps=60", "train.sample_every=0"]
# as measured, before the demo's server momentum and its augmented feature training
BASE += ["train.server_momentum=0.0", 'loss.feature_training="plain"', "train.warm_start=0"]
BASE += ["model.modes=1", "loss.codes_per_step=0"]  # and before its class modes
# (name, overrides): the clean runs first, then 20 % of every attack, then the other fractions
CELLS = [("clean", []), ("clean, distance rule", ['robust.rule="distance"']),
         ("clean, trimmed counts", ['robust.rule="trimmed"', "robust.trim=0.2"])]  # fmt: skip
for attack in ("ones", "invert", "random", "collude", "zeros"):
    hostile = ["faults.byzantine=0.2", f'faults.attack="{attack}"']
    CELLS += [(f"20% {attack}", hostile), (f"20% {attack}, distance rule", [*hostile, 'robust.rule="distance"'])]
CELLS += [
    ("20% replay", ["faults.byzantine=0.2", 'faults.attack="replay"']),
    ("30% invert", ["faults.byzantine=0.3", 'faults.attack="invert"']),
    ("30% invert, distance rule", ["faults.byzantine=0.3", 'faults.attack="invert"', 'robust.rule="distance"']),
    ("20% invert, trimmed counts", ["faults.byzantine=0.2", 'faults.attack="invert"', 'robust.rule="trimmed"']),
    ("30% dropouts", ["faults.dropout=0.3"]),
    ("10% invert", ["faults.byzantine=0.1", 'faults.attack="invert"']),
    ("10% invert, distance rule", ["faults.byzantine=0.1", 'faults.attack="invert"', 'robust.rule="distance"']),
]
# the order is the order of importance: an interrupted campaign still has the main rows


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_cell(name: str, overrides: list[str], root: Path, samples: int) -> dict:
    from prismfl import modelfile, rundir
    from prismfl.capabilities import MASK_MODEL
    from prismfl.config import load_config
    from prismfl.eval.evaluate import score_images
    from prismfl.fl import simulate

    out = root / slug(name)
    done = out / "robustness.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "fmnist-public.toml", [*BASE, *overrides])
    resume = (out / rundir.CHECKPOINT).exists()
    simulate.train(cfg, out, resume=resume, log=lambda *_: None)
    images = modelfile.sample(modelfile.materialize(modelfile.load(out / MASK_MODEL)), samples)
    s = score_images(images, cfg.data.dataset, n_real=samples)
    records = rundir.read_metrics(out)
    result = {
        "cell": name, "overrides": overrides, "domain_fid": s["domain_fid"], "class_kl": s["class_kl"],
        "confident_share": s["confident_share"], "class_histogram": s["class_histogram"],
        "uploads_rejected_by_the_wire": sum(len(r.get("failures", [])) for r in records),
        "uploads_left_out_by_the_rule": sum(len(r.get("rejected", [])) for r in records),
        "uploads_used": sum(len(r["clients"]) for r in records),
        "seconds": sum(r["seconds"] for r in records),
    }  # fmt: skip
    done.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("cell", "domain_fid", "uploads_left_out_by_the_rule")}), flush=True)
    return result


def main() -> None:
    from prismfl.progress import set_enabled

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/robustness")
    p.add_argument("--json", default="docs/benchmarks/robustness.json")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--only", default="", help="cell names separated by | (default: all)")
    a = p.parse_args()
    set_enabled(False)
    cells = [c for c in CELLS if not a.only or c[0] in a.only.split("|")]
    results = [run_cell(name, overrides, Path(a.out), a.samples) for name, overrides in cells]
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    Path(a.json).write_text(json.dumps({"date": datetime.date.today().isoformat(), "machine": machine,
                                        "command": "benchmarks/robustness.py", "base": BASE, "cells": results},
                                       indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
