"""Class-conditional PRISM on the demo federation, with and without privacy, and the conditional
PCA-Gaussian reference released by the same mechanism: the table of docs/results.md
("Class-conditional generation").

Every row is judged by `prismfl evaluate`'s protocol: domain FID of 10,000 samples (labels drawn
from the model's class shares) against the test set, label agreement, class KL, and train on
synthetic / test on real (the evaluation CNN trained on 60,000 generated labelled images for its
fixed schedule). One JSON file per row in --out, written when the row finishes; finished rows are
skipped, so several processes can share the work (give each its own --only) and a stopped run resumes.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conditional.py --only "no DP;eps 10" --seeds 0,1,2
      .venv/bin/python benchmarks/conditional.py --table      # the markdown table of what finished
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from prismfl import privacy, rundir  # noqa: F401 - privacy imported now: later edits cannot reach a running job
from prismfl.config import load_config
from prismfl.eval.evaluate import evaluate_file, evaluate_reference
from prismfl.fl import simulate
from prismfl.progress import set_enabled

CONFIG = "configs/fmnist-public.toml"
# every row runs the demo as it was when these rows were measured (12 rounds, no server momentum, the
# plain public feature net), so a row's figures stay reproducible when the demo's defaults move; a row's
# own overrides come after
BASE = [
    "train.rounds=12",
    "train.server_momentum=0.0",
    'loss.feature_training="plain"',
    "train.warm_start=0",
    "model.modes=1",
    "loss.codes_per_step=0",
]
SECAGG = ["privacy.pool=1.0", 'privacy.pool_classes="all"', "privacy.secagg=true"]
MEANS_PCA = ["loss.pool=4", 'loss.moment="mean"', "loss.pca=50"]
NINE = ["train.server_momentum=0.8", "train.rounds=9"]  # the demo's federation since the momentum rows
AUGMENTED = 'loss.feature_training="augmented"'  # issue 12's loss lever: the better-trained public net
SHRINK_PUBLIC = ["privacy.shrink=true", 'privacy.shrink_to="public"']
WARM = ["train.warm_start=1500", "train.rounds=5", "train.server_momentum=0.8", AUGMENTED]  # round 0 from public data
DEMO_SCHEDULE = ["train.warm_start=1000", "train.rounds=3"]  # the demo's since, on top of WARM: 1,000 steps + 3 rounds


def secagg(epsilon: float, pool: int, *extra: str) -> tuple[float, list[str]]:
    """A row with the secure sum of feature maps pooled `pool` x `pool`, at `epsilon`, plus more overrides."""
    return epsilon, [f"privacy.epsilon={epsilon}", f"loss.pool={pool}", *SECAGG, *extra]


VARIANTS = {  # name: (epsilon, overrides of the conditional demo config)
    "no DP": (math.inf, []),
    "eps 10": (10.0, ["privacy.epsilon=10.0"]),
    "eps 1": (1.0, ["privacy.epsilon=1.0"]),
    "eps 0.2": (0.2, ["privacy.epsilon=0.2"]),
    "eps 1, pool 4": (1.0, ["privacy.epsilon=1.0", "loss.pool=4"]),
    "eps 0.2, pool 4": (0.2, ["privacy.epsilon=0.2", "loss.pool=4"]),
    "eps 10, pool 4": (10.0, ["privacy.epsilon=10.0", "loss.pool=4"]),
    "no DP, pool 4": (math.inf, ["loss.pool=4"]),
    "eps 10, pool 4, means": (10.0, ["privacy.epsilon=10.0", "loss.pool=4", 'loss.moment="mean"']),
    "eps 1, pool 4, means": (1.0, ["privacy.epsilon=1.0", "loss.pool=4", 'loss.moment="mean"']),
    "eps 0.2, pool 4, means": (0.2, ["privacy.epsilon=0.2", "loss.pool=4", 'loss.moment="mean"']),
    "no DP, means": (math.inf, ['loss.moment="mean"']),
    "no DP, pool 4, means": (math.inf, ["loss.pool=4", 'loss.moment="mean"']),
    # issue 13: the clients' releases pooled by the server (privacy.pool), every class trained by every client
    "eps 10, pooled": (10.0, ["privacy.epsilon=10.0", "privacy.pool=1.0", 'privacy.pool_classes="all"']),
    "eps 1, pooled": (1.0, ["privacy.epsilon=1.0", "privacy.pool=1.0", 'privacy.pool_classes="all"']),
    "eps 0.2, pooled": (0.2, ["privacy.epsilon=0.2", "privacy.pool=1.0", 'privacy.pool_classes="all"']),
    "eps 1, pooled own": (1.0, ["privacy.epsilon=1.0", "privacy.pool=1.0"]),
    "eps 1, pool 4, pooled": (
        1.0,
        ["privacy.epsilon=1.0", "loss.pool=4", "privacy.pool=1.0", 'privacy.pool_classes="all"'],
    ),
    "eps 0.2, pool 4, pooled": (
        0.2,
        ["privacy.epsilon=0.2", "loss.pool=4", "privacy.pool=1.0", 'privacy.pool_classes="all"'],
    ),
    # distributed noise: the server learns only the secure sum of the clients' statistics (privacy.secagg)
    "eps 10, secagg": (10.0, ["privacy.epsilon=10.0", *SECAGG]),
    "eps 1, secagg": (1.0, ["privacy.epsilon=1.0", *SECAGG]),
    "eps 0.2, secagg": (0.2, ["privacy.epsilon=0.2", *SECAGG]),
    "eps 10, pool 4, secagg": (10.0, ["privacy.epsilon=10.0", "loss.pool=4", *SECAGG]),
    "eps 1, pool 4, secagg": (1.0, ["privacy.epsilon=1.0", "loss.pool=4", *SECAGG]),
    "eps 0.2, pool 4, secagg": (0.2, ["privacy.epsilon=0.2", "loss.pool=4", *SECAGG]),
    # the public principal components' mean and covariance per class among the matched statistics (loss.pca)
    "no DP, pca 50": (math.inf, ["loss.pca=50"]),
    "eps 10, pool 4, means, pca 50": (10.0, ["privacy.epsilon=10.0", *MEANS_PCA]),
    "eps 1, pool 4, means, pca 50": (1.0, ["privacy.epsilon=1.0", *MEANS_PCA]),
    "eps 0.2, pool 4, means, pca 50": (0.2, ["privacy.epsilon=0.2", *MEANS_PCA]),
    "eps 1, pool 4, means, pca 50, secagg": (1.0, ["privacy.epsilon=1.0", *MEANS_PCA, *SECAGG]),
    "eps 0.2, pool 4, means, pca 50, secagg": (0.2, ["privacy.epsilon=0.2", *MEANS_PCA, *SECAGG]),
    "eps 10, pool 4, secagg, shrink": (10.0, ["privacy.epsilon=10.0", "loss.pool=4", *SECAGG, "privacy.shrink=true"]),
    "eps 1, pool 4, secagg, shrink": (1.0, ["privacy.epsilon=1.0", "loss.pool=4", *SECAGG, "privacy.shrink=true"]),
    "eps 0.2, pool 4, secagg, shrink": (0.2, ["privacy.epsilon=0.2", "loss.pool=4", *SECAGG, "privacy.shrink=true"]),
    "eps 1, pool 4, means, pca 50, rff, secagg": (1.0, ["privacy.epsilon=1.0", *MEANS_PCA, "loss.rff=2000", *SECAGG]),
    # issue 12: a server optimiser on the global scores (heavy-ball momentum). The first three rows ran with the
    # float32 broadcast, which gives the same run as the deltas (tests/test_server_momentum.py)
    "no DP, momentum 0.5": (math.inf, ['train.broadcast="float32"', "train.server_momentum=0.5"]),
    "no DP, momentum 0.8": (math.inf, ['train.broadcast="float32"', "train.server_momentum=0.8"]),
    "no DP, momentum 0.9": (math.inf, ['train.broadcast="float32"', "train.server_momentum=0.9"]),
    "no DP, momentum 0.8, 9 rounds": (math.inf, NINE),
    # issue 12's schedule lever: the clients' learning rate decays over the rounds (a cosine to 0.1 x lr)
    "no DP, momentum 0.8, 9 rounds, cosine lr": (math.inf, [*NINE, 'train.lr_schedule="cosine"']),
    "no DP, momentum 0.8, 9 rounds, cosine lr 0.2": (math.inf, [*NINE, 'train.lr_schedule="cosine"', "train.lr=0.2"]),
    # issue 12's loss lever: the public feature net trained for 30 epochs on augmented public images
    "no DP, momentum 0.8, 9 rounds, augmented features": (math.inf, [*NINE, AUGMENTED]),
    "no DP, momentum 0.8, 9 rounds, one-cycle features": (math.inf, [*NINE, 'loss.feature_training="one-cycle"']),
    "eps 1, pool 4, secagg, augmented features": secagg(1.0, 4, AUGMENTED),
    "eps 10, pool 4, secagg, augmented features": secagg(10.0, 4, AUGMENTED),
    "eps 0.2, pool 4, secagg, augmented features": secagg(0.2, 4, AUGMENTED),
    "eps 1, pool 2, secagg, augmented features": secagg(1.0, 2, AUGMENTED),
    # the reference that reads no private data: the same training on the 5,000 public images alone
    "public only, augmented features": (math.inf, ['train.method="public"', AUGMENTED]),
    # the private rows' protocol (12 rounds, no momentum) without privacy, with the augmented net: their reference
    "no DP, augmented features": (math.inf, [AUGMENTED]),
    "eps 1, pool 4, secagg, momentum 0.8": secagg(1.0, 4, "train.server_momentum=0.8"),
    "eps 10, pool 4, secagg, momentum 0.8": secagg(10.0, 4, "train.server_momentum=0.8"),
    "eps 1, pool 4, means, secagg": (1.0, ["privacy.epsilon=1.0", "loss.pool=4", 'loss.moment="mean"', *SECAGG]),
    # issue 12's score-initialisation lever: the global scores of round 0 trained for 1,500 steps on the public
    # hold-out (train.warm_start), then 5 federated rounds with momentum (2,500 client steps)
    "no DP, warm start": (math.inf, WARM),
    "no DP, pool 4, warm start": (math.inf, ["loss.pool=4", *WARM]),  # the private rows' loss without noise
    "eps 10, pool 4, secagg, warm start": secagg(10.0, 4, *WARM),
    "eps 1, pool 4, secagg, warm start": secagg(1.0, 4, *WARM),
    "eps 0.2, pool 4, secagg, warm start": secagg(0.2, 4, *WARM),
    # the demo's settings since (a shorter warm start and 3 rounds: the demo within about 10 minutes)
    "no DP, warm start 1000, 3 rounds": (math.inf, [*WARM, *DEMO_SCHEDULE]),
    # the public-only references for it: its warm start alone (1,500 steps), and as many steps as it takes in all
    "public only, 1,500 steps": (math.inf, ['train.method="public"', "train.rounds=3", AUGMENTED]),
    "public only, 4,000 steps": (math.inf, ['train.method="public"', "train.rounds=8", AUGMENTED]),
    # issue 13: the secure sum shrunk toward the public images' own clipped statistics (privacy.shrink_to)
    "eps 10, pool 4, secagg, warm start, shrink public": secagg(10.0, 4, *WARM, *SHRINK_PUBLIC),
    "eps 1, pool 4, secagg, warm start, shrink public": secagg(1.0, 4, *WARM, *SHRINK_PUBLIC),
    "eps 0.2, pool 4, secagg, warm start, shrink public": secagg(0.2, 4, *WARM, *SHRINK_PUBLIC),
    "eps 10, secagg, warm start, shrink public": secagg(10.0, 1, *WARM, *SHRINK_PUBLIC),  # full-size feature maps
    "eps 1, secagg, warm start, shrink public": secagg(1.0, 1, *WARM, *SHRINK_PUBLIC),
    "eps 0.2, secagg, warm start, shrink public": secagg(0.2, 1, *WARM, *SHRINK_PUBLIC),
    # with a public set of 500 images (50 a class): a noisier target, and a feature net trained on them
    "no DP, warm start, 500 public": (math.inf, [*WARM, "partition.public_holdout=500"]),
    "eps 1, secagg, warm start, shrink public, 500 public": secagg(
        1.0, 1, *WARM, *SHRINK_PUBLIC, "partition.public_holdout=500"
    ),
    # issue 15's variety lever: each class split into 3 modes fitted on the public images (model.modes; a batch
    # must hold two images of each of the 30 codes, so 64 instead of 32: the row without modes at 64 for scale)
    "no DP, warm start 1000, 3 rounds, batch 64": (math.inf, [*WARM, *DEMO_SCHEDULE, "train.batch_size=64"]),
    "no DP, warm start 1000, 3 rounds, 3 modes": (
        math.inf,
        [*WARM, *DEMO_SCHEDULE, "train.batch_size=64", "model.modes=3"],
    ),
    "no DP, warm start 1000, 3 rounds, 6 modes": (
        math.inf,
        [*WARM, *DEMO_SCHEDULE, "train.batch_size=120", "model.modes=6"],
    ),
    "eps 10, secagg, warm start 1000, 3 rounds, shrink public, 3 modes": secagg(
        10.0, 1, *WARM, *SHRINK_PUBLIC, *DEMO_SCHEDULE, "train.batch_size=64", "model.modes=3"
    ),
    "eps 1, secagg, warm start 1000, 3 rounds, shrink public, 3 modes": secagg(
        1.0, 1, *WARM, *SHRINK_PUBLIC, *DEMO_SCHEDULE, "train.batch_size=64", "model.modes=3"
    ),
    # the same modes at the demo's batch 32: each step draws 16 of the codes a client holds (loss.codes_per_step)
    "no DP, warm start 1000, 3 rounds, 3 modes, 16 codes a step": (
        math.inf,
        [*WARM, *DEMO_SCHEDULE, "model.modes=3", "loss.codes_per_step=16"],
    ),
    # the demo since 2026-11-27 evening: the shipped public net freed the time for WARM's longer schedule
    "no DP, warm start 1500, 5 rounds, 3 modes, 16 codes a step": (
        math.inf,
        [*WARM, "model.modes=3", "loss.codes_per_step=16"],
    ),
    "no DP, warm start 1000, 3 rounds, 6 modes, 16 codes a step": (
        math.inf,
        [*WARM, *DEMO_SCHEDULE, "model.modes=6", "loss.codes_per_step=16"],
    ),
    # issue 12's schedule lever within the warm start: its lr on a cosine from 0.1 to 0.01 (the demo's row above)
    "no DP, warm start 1000 cosine, 3 rounds, 3 modes, 16 codes a step": (
        math.inf,
        [*WARM, *DEMO_SCHEDULE, "model.modes=3", "loss.codes_per_step=16", 'train.warm_start_schedule="cosine"'],
    ),
    # ... and the lr itself, warm start and rounds (a decay settles each class on its typical image: higher?)
    "no DP, warm start 1000, 3 rounds, 3 modes, 16 codes a step, lr 0.2": (
        math.inf,
        [*WARM, *DEMO_SCHEDULE, "model.modes=3", "loss.codes_per_step=16", "train.lr=0.2"],
    ),
    "eps 10, secagg, warm start 1000, 3 rounds, shrink public, 3 modes, 16 codes a step": secagg(
        10.0, 1, *WARM, *SHRINK_PUBLIC, *DEMO_SCHEDULE, "model.modes=3", "loss.codes_per_step=16"
    ),
    "pca-gaussian": (math.inf, None),
    "pca-gaussian eps 10": (10.0, None),
    "pca-gaussian eps 1": (1.0, None),
    "pca-gaussian eps 0.2": (0.2, None),
}
MACHINE = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
KEYS = ("domain_fid", "label_agreement", "class_kl", "confident_share", "recall", "tstr_accuracy", "real_accuracy")


def run_row(name: str, seed: int, a) -> dict:
    epsilon, overrides = VARIANTS[name]
    t0 = time.perf_counter()
    if overrides is None:  # a reference: no training; its randomness is the seed (and, with DP, the OS)
        result = evaluate_reference("pca-gaussian", "fashion-mnist", n=a.samples, seed=seed, synthetic=a.synthetic,
                                    epsilon=epsilon)  # fmt: skip
        extra = {}
    else:
        cfg = load_config(a.config, [*BASE, *overrides, f"seed={seed}", "train.sample_every=0"])
        run = Path(a.runs) / f"{name}@{seed}".replace(" ", "_").replace(",", "")
        shutil.rmtree(run, ignore_errors=True)
        lines: list[str] = []
        simulate.train(cfg, run, log=lambda line: lines.append(str(line)))
        records = rundir.read_metrics(run)
        result = evaluate_file(run / rundir.MODEL, a.samples, 0, synthetic=a.synthetic)
        shutil.copy(run / "samples.png", Path(a.out) / f"{name}@{seed}.png".replace(" ", "_").replace(",", ""))
        extra = {"train_seconds": round(sum(r["seconds"] for r in records), 1), "model_bytes": result["model_bytes"],
                 "upload_MB": round(sum(r["upload_bytes"] for r in records) / 1e6, 2),
                 "epsilon_spent": records[-1]["epsilon"],
                 "setup_log": [s for s in lines if s.startswith(("secure aggregation", "privacy"))]}  # fmt: skip
    return {"name": name, "seed": seed, "epsilon": epsilon, "overrides": overrides,
            "seconds": round(time.perf_counter() - t0, 1), **{k: result.get(k) for k in KEYS},
            "per_class_fid": result.get("per_class_fid"), "tstr_per_class": result.get("tstr_per_class"),
            "class_histogram": result["class_histogram"], **extra, "protocol": result["protocol"],
            "date": date.today().isoformat(), "machine": MACHINE}  # fmt: skip


def table(out: Path) -> str:
    rows: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*.json")):
        r = json.loads(path.read_text())
        rows.setdefault(r["name"], []).append(r)
    lines = ["| row | seeds | domain FID | label agreement | class KL | train on synthetic | train s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(rs, key, digits):
        v = [r[key] for r in rs if r.get(key) is not None]
        if not v:
            return "-"
        return f"{np.mean(v):.{digits}f}" + (f" ± {np.std(v):.{digits}f}" if len(v) > 1 else "")

    for name in VARIANTS:
        if name in rows:
            rs = rows[name]
            cells = [cell(rs, "domain_fid", 1), cell(rs, "label_agreement", 3), cell(rs, "class_kl", 3),
                     cell(rs, "tstr_accuracy", 3), cell(rs, "train_seconds", 0)]  # fmt: skip
            lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--only", default="", help="row names separated by ; (default: all)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--synthetic", type=int, default=60000)
    p.add_argument("--runs", default="runs/conditional")
    p.add_argument("--out", default="docs/benchmarks/conditional")
    p.add_argument("--table", action="store_true", help="print the markdown table of the finished rows")
    a = p.parse_args()
    out = Path(a.out)
    if a.table:
        print(table(out))
        return
    set_enabled(False)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in a.only.split(";")] if a.only else list(VARIANTS)
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown row {name!r}; expected one of {', '.join(VARIANTS)}")
    for name in names:
        for seed in [int(s) for s in a.seeds.split(",")]:
            path = out / f"{name}@{seed}.json".replace(" ", "_").replace(",", "")
            if path.exists():
                continue
            row = run_row(name, seed, a)
            path.write_text(json.dumps(row, indent=1) + "\n")
            print(f"{name}@{seed}: FID {row['domain_fid']:.1f}, agreement {row['label_agreement']:.3f}, "
                  f"KL {row['class_kl']:.3f}, train-on-synthetic {row['tstr_accuracy']:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
