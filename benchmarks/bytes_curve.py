"""Quality per byte: the quick domain FID of runs (train.eval_every > 0) against the bytes their clients
uploaded so far (or, --x total, uploaded and downloaded), and the bytes each run needed to reach given FIDs.

Run: .venv/bin/python benchmarks/bytes_curve.py RUN_DIR [RUN_DIR ...] --out docs/img/bytes-to-fid.png
     .venv/bin/python benchmarks/bytes_curve.py RUN_DIR [RUN_DIR ...] --x total --out docs/img/traffic-to-fid.png
     .venv/bin/python benchmarks/bytes_curve.py RUN_DIR --x seconds --out docs/img/hour-fid.png
     (--x seconds: the quick FID against the rounds' cumulative wall time instead of the bytes;
      --offset S adds the S seconds before round 1, set-up and warm start, read off the run's log)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prismfl import rundir
from prismfl.runreport import setup_traffic


def curve(run: Path, x: str = "bytes", offset: float = 0.0) -> list[tuple[int, float, float]]:
    """(round, quick domain FID, cumulative upload bytes, upload + download bytes ("total") or round seconds)
    for every round with a quick FID; `offset` is where the count starts (seconds before round 1). The
    total starts at the set-up's bytes both ways (a run without public images: the clients' statistics and
    moment sums, the modes), which the run's model file records."""
    records, total, out = rundir.read_metrics(run), offset, []
    if x == "total":
        total += sum((setup_traffic(run) or {}).values())
    for r in records:
        total += {"bytes": r["upload_bytes"], "total": r["upload_bytes"] + r["download_bytes"],
                  "seconds": r["seconds"]}[x]  # fmt: skip
        if r.get("domain_fid") is not None:
            out.append((r["round"], r["domain_fid"], total))
    return out


def bytes_to_reach(points: list[tuple[int, float, int]], fid: float) -> int | None:
    """Upload bytes at the first round whose quick FID is at or below `fid` (None: never)."""
    return next((b for _, f, b in points if f <= fid), None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("bytes-to-fid.png"))
    p.add_argument("--targets", default="80,60,50", help="FIDs to report the bytes needed for")
    p.add_argument("--x", choices=("bytes", "total", "seconds"), default="bytes", help="what the x axis counts")
    p.add_argument("--offset", type=float, default=0.0, help="--x seconds: seconds before round 1 (warm start)")
    a = p.parse_args()
    if a.offset and a.x != "seconds":
        p.error("--offset counts seconds: it needs --x seconds")
    unit, scale = ("min", 60.0) if a.x == "seconds" else ("MB", 1e6)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    summary = {}
    for run in a.runs:
        points = curve(run, a.x, a.offset)
        method = rundir.checkpoint_config(rundir.load_checkpoint(run)).train.method
        ax.plot([b / scale for *_, b in points], [f for _, f, _ in points], marker=".", label=f"{run.name} ({method})")
        targets = {t: bytes_to_reach(points, float(t)) for t in a.targets.split(",")}
        summary[run.name] = {"method": method, "curve": points, f"{a.x}_to_reach": targets}
        print(run.name, " ".join(f"FID<={t}: {'never' if b is None else f'{b / scale:.1f} {unit}'}" for t, b in
                                 targets.items()))  # fmt: skip
    if a.x != "seconds":
        what = "uploaded" if a.x == "bytes" else "uploaded and downloaded"
        more = ", set-up included" if a.x == "total" else ""
        ax.set(xscale="log", xlabel=f"MB {what} by all clients (cumulative{more})", title=f"quality per {what} byte")
    else:
        what = "set-up, warm start and rounds" if a.offset else "rounds"
        ax.set(xlabel=f"minutes of {what} (cumulative wall time)", title="quality against training time")
    ax.set(ylabel="quick domain FID (1,000 samples)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # from 0: a curve that moves by hundredths must look flat
    if a.offset:
        ax.set_xlim(left=0)  # the run starts at 0: the warm start is the span before the first point
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=100)
    a.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {a.out} and {a.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
