"""The canary audit of the private release (prismfl/audit.py) at the epsilons of docs/results.md:
an empirical lower bound on epsilon for one client's release and for the secure sum of 10 clients,
beside the accountant's figure, and a negative control (a release calibrated for epsilon 40 that
claims the smaller one) that shows what the audit can detect with this many trials.

Run:  .venv/bin/python benchmarks/audit.py --trials 10000 --out docs/benchmarks/privacy/audit.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from datetime import date

import torch

from prismfl.audit import audit


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=10000)
    p.add_argument("--secagg-trials", type=int, default=2000)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--out", default="docs/benchmarks/privacy/audit.json")
    a = p.parse_args()
    rows = []
    cases = [(e, 0, None, a.trials) for e in (0.2, 1.0, 4.0, 10.0)]
    cases += [(1.0, 10, None, a.secagg_trials), (4.0, 0, 40.0, a.trials), (1.0, 10, 40.0, a.secagg_trials)]
    for epsilon, secagg, release, trials in cases:
        t0 = time.perf_counter()
        got = audit(trials, epsilon=epsilon, delta=a.delta, secagg=secagg, release_epsilon=release)
        row = {**asdict(got), "secagg": secagg, "release_epsilon": release or epsilon,
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    meta = {"command": f"benchmarks/audit.py --trials {a.trials} --secagg-trials {a.secagg_trials}",
            "date": date.today().isoformat(), "machine": machine}  # fmt: skip
    with open(a.out, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
