"""The experiment grid: datasets x partitions x methods x seeds, trained and evaluated the same way,
summarised as a results table in the paper's shape with curves. Finished cells are skipped, so an
interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prismfl import rundir
from prismfl.config import load_config
from prismfl.files import MAX_RECORD_BYTES, atomic_write_bytes, read_capped
from prismfl.progress import bar

EVAL_FILE = "evaluation.json"
# grid rows that are a method with settings: the paper's PRISM-dagger is prism without MADA
VARIANTS = {"prism-nomada": ['train.method="prism"', "train.mada=false"]}


def method_overrides(method: str) -> list[str]:
    return VARIANTS.get(method, [f'train.method="{method}"'])


@dataclass(frozen=True)
class Cell:
    dataset: str
    partition: str
    method: str
    seed: int

    def path(self, root: Path) -> Path:
        return root / self.dataset / self.partition / self.method / f"seed-{self.seed}"


def cells(datasets, partitions, methods, seeds) -> list[Cell]:
    return [Cell(d, p, m, s) for d in datasets for p in partitions for m in methods for s in seeds]


def run_cell(cell: Cell, config: str, overrides: list[str], root: Path, *, samples: int, log=print) -> dict:
    """Train (or resume) one cell and evaluate it; return its evaluation."""
    from prismfl.errors import PrismError
    from prismfl.eval.evaluate import evaluate
    from prismfl.fl.simulate import train

    out = cell.path(root)
    if (out / EVAL_FILE).exists():
        return _evaluation(out / EVAL_FILE)
    cfg = load_config(config, [*overrides, f'data.dataset="{cell.dataset}"', f'partition.scheme="{cell.partition}"',
                               *method_overrides(cell.method), f"seed={cell.seed}"])  # fmt: skip
    resume = (out / rundir.CHECKPOINT).exists()
    try:
        same = resume and rundir.load_checkpoint(out)["config"] == cfg.to_dict()
    except PrismError:  # unreadable or from an older prismfl: train the cell again
        same = False
    if resume and not same:
        shutil.rmtree(out)  # the grid's settings changed since: start the cell again
        resume = False
    elif not resume and out.exists():
        shutil.rmtree(out)
    log(f"grid: {cell.dataset} / {cell.partition} / {cell.method} / seed {cell.seed}")
    train(cfg, out, resume=resume, log=lambda *_: None)
    result = evaluate(out, n=samples)
    records = rundir.read_metrics(out)
    result["train"] = {
        "rounds": len(records),
        "upload_bytes_per_round": float(np.mean([r["upload_bytes"] for r in records])),
        "download_bytes_per_round": float(np.mean([r["download_bytes"] for r in records])),
        "seconds": float(sum(r["seconds"] for r in records)),
        "curve": [
            (r["round"], r["domain_fid"], sum(q["upload_bytes"] for q in records[: i + 1]))
            for i, r in enumerate(records)
            if r.get("domain_fid") is not None
        ],  # fmt: skip
    }
    atomic_write_bytes(out / EVAL_FILE, json.dumps(result, indent=1).encode())
    return result


def finished(grid: list[Cell], root: Path) -> dict:
    """The evaluations of the cells that have finished; the others are left out (nothing is trained)."""
    return {c: _evaluation(c.path(root) / EVAL_FILE) for c in grid if (c.path(root) / EVAL_FILE).exists()}


def _evaluation(path: Path) -> dict:
    return json.loads(read_capped(path, MAX_RECORD_BYTES, "evaluation"))


def run_grid(grid: list[Cell], config: str, overrides: list[str], root: Path, *, samples: int, log=print) -> dict:
    results = {}
    for cell in bar(grid, desc="grid", unit="run", leave=True):
        results[cell] = run_cell(cell, config, overrides, root, samples=samples, log=log)
    return results


METRICS = [("domain FID", "domain_fid", 1), ("precision", "precision", 3), ("recall", "recall", 3),
           ("density", "density", 3), ("coverage", "coverage", 3), ("class KL", "class_kl", 3)]  # fmt: skip


def _mean_spread(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def results_markdown(results: dict[Cell, dict], header: str) -> str:
    """One table per dataset x partition, a row per method: mean ± standard deviation over seeds."""
    lines = [header, ""]
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for cell, r in results.items():
        groups.setdefault((cell.dataset, cell.partition), {}).setdefault(cell.method, []).append(r)
    for (dataset, partition), by_method in groups.items():
        seeds = max(len(v) for v in by_method.values())
        lines += [
            f"### {dataset}, {partition} partition (up to {seeds} seed{'s' * (seeds > 1)}; mean ± standard deviation)",
            "",
        ]
        cols = ["seeds"] + [name for name, _, _ in METRICS] + ["upload / round", "final model"]
        lines.append("| method | " + " | ".join(cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for method, rs in by_method.items():
            cells_ = [_mean_spread([r[key] for r in rs], d) for _, key, d in METRICS]
            up = np.mean([r["train"]["upload_bytes_per_round"] for r in rs]) / 1e6
            size = np.mean([r["model_bytes"] for r in rs]) / 1e3
            lines.append(f"| {method} | {len(rs)} | " + " | ".join(cells_) + f" | {up:.3f} MB | {size:.0f} kB |")
        lines.append("")
        if "prism" in by_method and "fedavg" in by_method:
            lines += [against_fedavg(by_method["prism"], by_method["fedavg"]), ""]
    return "\n".join(lines)


def against_fedavg(prism: list[dict], fedavg: list[dict]) -> str:
    """PRISM against dense FedAvg as plain ratios of the seed means: quality, upload bytes, model bytes."""

    def mean(rs, get):
        return float(np.mean([get(r) for r in rs]))

    fid = mean(prism, lambda r: r["domain_fid"]) / mean(fedavg, lambda r: r["domain_fid"])
    up = mean(fedavg, lambda r: r["train"]["upload_bytes_per_round"]) / mean(
        prism, lambda r: r["train"]["upload_bytes_per_round"])  # fmt: skip
    size = mean(fedavg, lambda r: r["model_bytes"]) / mean(prism, lambda r: r["model_bytes"])
    verdict = "worse" if fid > 1 else "better"
    return (f"PRISM against dense FedAvg: domain FID x{fid:.2f} ({verdict}), {up:.1f}x fewer upload bytes per "
            f"round, a {size:.1f}x smaller final model.")  # fmt: skip


def plot_curves(results: dict[Cell, dict], path: Path) -> None:
    """Domain FID against rounds and against cumulative uploaded MB, per dataset x partition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], dict[str, list]] = {}
    for cell, r in results.items():
        groups.setdefault((cell.dataset, cell.partition), {}).setdefault(cell.method, []).append(r["train"]["curve"])
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.4 * len(groups)), squeeze=False)
    for row, ((dataset, partition), by_method) in enumerate(groups.items()):
        for method, curves in by_method.items():
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            rounds = [c[0] for c in curves[0][:n]]
            fid = np.mean([[c[1] for c in cur[:n]] for cur in curves], axis=0)
            mb = np.mean([[c[2] / 1e6 for c in cur[:n]] for cur in curves], axis=0)
            axes[row, 0].plot(rounds, fid, marker=".", label=method)
            if mb[-1] > 0:
                axes[row, 1].plot(mb, fid, marker=".", label=method)
        axes[row, 0].set(title=f"{dataset}, {partition}: domain FID by round", xlabel="round", ylabel="domain FID")
        axes[row, 1].set(title="domain FID by uploaded MB (cumulative)", xlabel="MB uploaded", ylabel="domain FID")
        axes[row, 1].set_xscale("log")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # a cell of central runs alone uploads nothing
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no upload (central only)", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
