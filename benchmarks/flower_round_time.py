"""Round time on Flower against the in-process simulator, in one invocation, on one machine.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flower_round_time.py --clients 10 --rounds 3 --out runs/flower-bench

Runs configs/smoke.toml with --clients clients and --rounds rounds (no sample grids) three times, one
after the other, with the same seed: `prismfl train` (one process), `flwr run` on Flower's simulation
engine (a SuperLink with --simulation: Ray, one ClientApp actor per core), and `flwr run` on a loopback
deployment (a SuperLink and one SuperNode process per client, each message handled by a fresh
ClientApp process). Every process gets OMP_NUM_THREADS=1. The three must export the same model
(checked); the round times come from each run's metrics.jsonl. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository (the Flower app's directory)
SMOKE = ROOT / "configs" / "smoke.toml"
sys.path.insert(0, str(ROOT / "tests"))  # the loopback deployment is the Flower tests' harness, tests/loopback.py

from loopback import Loopback  # noqa: E402
from prismfl import rundir  # noqa: E402
from prismfl.capabilities import MASK_MODEL  # noqa: E402


def round_seconds(run: Path) -> list[float]:
    return [r["seconds"] for r in rundir.read_metrics(run)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/flower-bench"))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds allowed to each Flower run")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        ap.error(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    overrides = f"partition.num_clients={args.clients} train.rounds={args.rounds} train.sample_every=0"
    run_config = {"config-file": str(SMOKE), "overrides": overrides, "reply-timeout": args.timeout}
    walls = {}

    t = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "prismfl.cli", "train", "-q", "-c", str(SMOKE), "--out", str(out / "simulator")]
    subprocess.run(cmd + [a for item in overrides.split() for a in ("--set", item)], env=env, check=True)
    walls["simulator"] = time.perf_counter() - t

    t = time.perf_counter()
    with Loopback(out / "engine-processes", 0, simulation=True) as lb:
        federation = {"num-supernodes": args.clients, "client-resources-num-cpus": 1}
        result = lb.run(ROOT, {**run_config, "out-dir": str(out / "simulation-engine")}, args.timeout, federation)
    walls["simulation-engine"] = time.perf_counter() - t
    if result.status != "finished:completed":
        raise SystemExit(f"simulation engine run {result.status}:\n{result.log[-3000:]}")

    t = time.perf_counter()
    with Loopback(out / "deployment-processes", args.clients) as lb:
        result = lb.run(ROOT, {**run_config, "out-dir": str(out / "deployment")}, args.timeout)
    walls["deployment"] = time.perf_counter() - t
    if result.status != "finished:completed":
        raise SystemExit(f"deployment run {result.status}:\n{result.log[-3000:]}")

    model = (out / "simulator" / MASK_MODEL).read_bytes()
    same = all((out / name / MASK_MODEL).read_bytes() == model for name in ("simulation-engine", "deployment"))
    rows, base = [], None
    for name in ("simulator", "simulation-engine", "deployment"):
        secs = round_seconds(out / name)
        later = statistics.mean(secs[1:]) if len(secs) > 1 else secs[0]
        base = later if base is None else base
        rows.append({"engine": name, "round_seconds": secs, "mean_after_first": later, "ratio": later / base,
                     "wall_seconds": walls[name]})  # fmt: skip
    (out / "benchmark.json").write_text(json.dumps({"clients": args.clients, "rounds": args.rounds,
                                                    "same_model": same, "rows": rows}, indent=1) + "\n")  # fmt: skip
    print(f"| engine ({args.clients} clients, smoke.toml) | round 1 s | later rounds s (mean) | ratio | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['round_seconds'][0]:.2f} | {r['mean_after_first']:.2f} | "
              f"{r['ratio']:.1f}x | {r['wall_seconds']:.0f} |")  # fmt: skip
    print(f"same model.prism from all three: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
