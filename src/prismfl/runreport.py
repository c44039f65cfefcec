"""report.md in a run directory: settings, samples, curves, communication, privacy, quality."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np

from prismfl import rundir
from prismfl.capabilities import MASK_MODEL
from prismfl.config import MAX_CONFIG_BYTES
from prismfl.files import MAX_RECORD_BYTES, atomic_write_bytes, read_capped
from prismfl.plots import PAPER_BITS_PER_WEIGHT, PAPER_MB_PER_ROUND


def _num_weights(records: list[dict]) -> int:
    """The model's weight count N, from a round record (bits_per_param = 8 x upload bytes / (N x clients))."""
    for r in records:
        if r.get("bits_per_param") and r.get("clients"):
            return round(8 * r["upload_bytes"] / (r["bits_per_param"] * len(r["clients"])))
    return 0


def setup_traffic(run_dir: Path) -> dict | None:
    """The set-up's payload bytes a run's model file records ({"up", "down"}), None where there were none."""
    model = run_dir / MASK_MODEL
    if not model.exists():
        return None
    from prismfl import modelfile

    traffic = modelfile.load(model).info.get("setup_traffic")
    if not (isinstance(traffic, dict) and all(type(traffic.get(k)) is int and traffic[k] >= 0 for k in ("up", "down"))):
        return None
    return traffic if traffic["up"] or traffic["down"] else None


def run_report(run_dir: Path) -> Path:
    """Write report.md in a run directory from its config, metrics, model and evaluation."""
    run_dir = Path(run_dir)
    cfg = tomllib.loads(read_capped(run_dir / rundir.CONFIG, MAX_CONFIG_BYTES, "run config").decode())
    records = rundir.read_metrics(run_dir)
    t = cfg["train"]
    lines = [f"# Run report: {run_dir.name}", ""]
    lines += [
        f"- method **{t['method']}**, dataset **{cfg['data']['dataset']}**, {cfg['partition']['num_clients']} clients, "
        f"'{cfg['partition']['scheme']}' partition, seed {cfg['seed']}",
        f"- {cfg['model']['arch']} generator (width {cfg['model']['width']}"
        + (f", {cfg['model']['modes']} modes a class" if cfg["model"].get("modes", 1) > 1 else "")
        + f"), {t['rounds']} rounds x "
        f"{t['local_steps']} local steps, batch {t['batch_size']}, {t['client_fraction']:.0%} of clients per round, "
        f"MADA {'on' if t['method'] == 'prism' and t['mada'] else 'off'}",
        f"- loss: {cfg['loss']['features']} features, "
        f"'{cfg['loss']['moment']}' matching, tracker {cfg['loss']['tracker']}"
        + (f", {cfg['loss']['codes_per_step']} codes a step" if cfg["loss"].get("codes_per_step") else ""),
        f"- wall time of the rounds: {sum(r['seconds'] for r in records):.0f} s",
        "",
        *(
            ["Samples of the class-conditional model, one row per class (top to bottom: class 0, 1, ...):", ""]
            if cfg["model"].get("conditional")
            else []
        ),
        "![samples](samples.png)",
        "",
        "![curves](curves.png)",
        "",
    ]
    setup = setup_traffic(run_dir)
    if records:
        up = sum(r["upload_bytes"] for r in records)
        down = sum(r["download_bytes"] for r in records)
        uploads = sum(len(r["clients"]) for r in records)
        last = records[-1]
        n = _num_weights(records)
        dense = 2 * 4 * n * uploads if n else 0  # dense FedAvg: float32 weights down and up, each client-round
        versus = f" ({(up + down) / dense:.3f} x dense FedAvg's {dense / 1e6:.2f} MB)" if dense else ""
        per_weight = (lambda b: f" | {8 * b / (n * max(uploads, 1)):.2f}") if n else (lambda b: "")
        head = "| | total | per client-round |" + (" bits per weight and client-round |" if n else "")
        lines += ["## Communication", "",
                  head, "|---|---|---|" + ("---|" if n else ""),
                  f"| uploaded | {up / 1e6:.2f} MB | {up / max(uploads, 1) / 1e3:.1f} kB{per_weight(up)} |",
                  f"| downloaded | {down / 1e6:.2f} MB | {down / max(uploads, 1) / 1e3:.1f} kB{per_weight(down)} |",
                  f"| total | {(up + down) / 1e6:.2f} MB | {(up + down) / max(uploads, 1) / 1e3:.1f} kB"
                  f"{per_weight(up + down)} |", "",
                  f"Traffic up and down: {(up + down) / 1e6:.2f} MB{versus}.", "",
                  *([f"Set-up, before round 1: {setup['up'] / 1e6:.2f} MB up (the clients' moment sums for the "
                     f"modes and feature statistics for the warm start) and {setup['down'] / 1e6:.2f} MB down (the "
                     f"modes); with it, {(up + down + setup['up'] + setup['down']) / 1e6:.2f} MB in all"
                     + (f" ({(up + down + setup['up'] + setup['down']) / dense:.3f} x dense FedAvg's rounds)."
                        if dense else "."), ""] if setup else []),
                  f"Upload cost: {np.mean([r['bits_per_param'] for r in records]):.3f} bits/weight on average, "
                  f"{last['bits_per_param']:.3f} in the last round (entropy bound "
                  f"{last.get('entropy_bound_bits_per_param') or 0:.3f}); packing costs 1 bit/weight, dense "
                  f"FedAvg's float32 32 bits/weight; the paper reports {PAPER_MB_PER_ROUND} MB per round for its "
                  f"3.5M-weight model ({PAPER_BITS_PER_WEIGHT:.1f} bits/weight).", ""]  # fmt: skip
    lost = [f for r in records for f in r.get("failures", [])]
    rejected = [x for r in records for x in r.get("rejected", [])]
    if lost or rejected:
        rule = cfg.get("robust", {}).get("rule", "none")
        lines += ["## Faults", "",
                  f"{len(lost)} uploads did not arrive or were refused by the wire checks, and the robust rule "
                  f"'{rule}' left out {len(rejected)} more, over {len(records)} rounds (each listed in "
                  "metrics.jsonl under `failures` and `rejected`).", ""]  # fmt: skip
    model = run_dir / MASK_MODEL
    if model.exists():
        from prismfl import modelfile

        info = modelfile.load(model).info
        lines += [
            "## Model",
            "",
            f"`model.prism`: {model.stat().st_size:,} bytes (seed + architecture + packed mask).",
            "",
        ]
        if info.get("privacy"):
            p = info["privacy"]
            lines += [
                "## Privacy",
                "",
                f"Each client's statistics were released once with epsilon = {p['epsilon']:.3f}, "
                f"delta = {p['delta']:g} (record-level, per client; noise std {p['noise_std']:.2f} in clipped "
                "units); everything after is post-processing. See docs/privacy.md.",
                "",
            ]
    evaluation = run_dir / "evaluation.json"
    if evaluation.exists():
        q = json.loads(read_capped(evaluation, MAX_RECORD_BYTES, "evaluation"))
        lines += ["## Quality", "", "| metric | value |", "|---|---|"]
        for key in ("domain_fid", "precision", "recall", "density", "coverage", "confident_share", "class_kl",
                    "inception_fid", "label_agreement", "tstr_accuracy", "real_accuracy"):  # fmt: skip
            if key in q:
                lines.append(f"| {key} | {q[key]:.4f} |")
        names = q.get("class_names") or [str(i) for i in range(len(q["class_histogram"]))]
        if q.get("per_class_fid"):
            accs = q.get("tstr_per_class") or [None] * len(names)
            lines += ["", "| class | samples classified as it | domain FID of its samples | train-on-synthetic acc. |",
                      "|---|---|---|---|"]  # fmt: skip
            for name, count, fid, acc in zip(names, q["class_histogram"], q["per_class_fid"], accs):
                lines.append(f"| {name} | {count} | {'-' if fid is None else f'{fid:.1f}'} | "
                             f"{'-' if acc is None else f'{acc:.3f}'} |")  # fmt: skip
        lines += ["", "Classes of the samples: " + ", ".join(f"{a} {b}" for a, b in zip(names, q["class_histogram"])),
                  "", *[f"- {k}: {v}" for k, v in q["protocol"].items()], ""]  # fmt: skip
    path = run_dir / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
