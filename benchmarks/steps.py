"""Milliseconds per local step for each architecture, aggregation time, and round time vs client time.

Run: .venv/bin/python benchmarks/steps.py [--steps 30] [--out docs/benchmarks/steps.json]
     .venv/bin/python benchmarks/steps.py --quality   (issue 12's demo variants, interleaved, batch 32)
     .venv/bin/python benchmarks/steps.py --modes     (issue 15's modes variants, interleaved)
     .venv/bin/python benchmarks/steps.py --hour      (the one-hour candidates, two threads: their step budgets)
Everything is measured in this one process, side by side, on synthetic images (the step cost does
not depend on the pixels), so the ratios hold even on a noisy shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import torch

from prismfl.config import load_config
from prismfl.fl import aggregate
from prismfl.fl.client import ClientState, LocalConfig, client_loss, local_train
from prismfl.loss import feature_nets
from prismfl.loss.features import SmallCNN
from prismfl.loss.matching import feature_stats
from prismfl.model import masked
from prismfl.model.build import build_model, initial_scores

ARCHS = {
    "mlp-512 (demo default), 28x28": ["model.arch=mlp", "model.width=512", "model.z_dim=64"],
    "dcgan-64, 28x28": ["model.arch=dcgan", "model.width=64", "model.z_dim=64"],
    "resnet-64 (paper), 32x32": ["model.arch=resnet", "model.width=64", "model.z_dim=128", "data.resize=32"],
}


# The demo's generator and loss before and after issue 12, each setting explicit
QUALITY = {
    "mlp, features 16": ["model.arch=mlp", "loss.feature_width=16", "loss.class_term=false"],
    "mlp, features 32 + class term": ["model.arch=mlp", "loss.feature_width=32", "loss.class_term=true"],
    "mlp-up, features 16": ["model.arch=mlp-up", "loss.feature_width=16", "loss.class_term=false"],
    "mlp-up, features 32 + class term": ["model.arch=mlp-up", "loss.feature_width=32", "loss.class_term=true"],
}


# The demo's class modes switched off: the scripts' variants were measured before the demo had them
BEFORE_MODES = ["model.modes=1", "loss.codes_per_step=0"]

# The class-conditional demo (warm start and all) with and without modes (issue 15's variety lever); a
# variant's own train.batch_size wins over --batch. Every client holds all its codes here: the worst case.
MODES = {
    "no modes (the demo before modes), batch 32": [],
    "3 modes, batch 64": ["model.modes=3", "train.batch_size=64"],
    "3 modes, batch 32, 16 codes a step": ["model.modes=3", "loss.codes_per_step=16"],
    "3 modes, batch 32, 8 codes a step": ["model.modes=3", "loss.codes_per_step=8"],
    "6 modes, batch 32, 16 codes a step": ["model.modes=6", "loss.codes_per_step=16"],
    "6 modes, batch 120": ["model.modes=6", "train.batch_size=120"],
}

# The one-hour configuration's candidates (configs/fmnist-hour.toml, benchmarks/hour_gpu.sh) against the
# demo's step, on two threads as the hour runs: each candidate's steps in an hour follow from these
WIDE = ["model.modes=3", "model.width=1024"]
HOUR = {
    "the demo (width 512, batch 32, 3 modes, 16 codes a step)": ["model.modes=3", "loss.codes_per_step=16"],
    "width 1,024, batch 128, 3 modes, public net 32": WIDE + ["train.batch_size=128"],
    "width 1,024, batch 128, 3 modes, public net 64": WIDE + ["train.batch_size=128", "loss.feature_width=64"],
    "width 1,024, batch 64, 3 modes, public net 64": WIDE + ["train.batch_size=64", "loss.feature_width=64"],
}


def step_setup(overrides: list[str], batch: int, conditional: bool = False) -> dict:
    """Generator, feature net (with the config's optional layers), loss and scores of one variant."""
    # the unconditional generator, as measured before the demo became class-conditional (issue 15)
    first = [*BEFORE_MODES] if conditional else [*BEFORE_MODES, "model.conditional=false"]
    cfg = load_config("configs/fmnist-public.toml", [*first, f"train.batch_size={batch}", *overrides])
    size = cfg.data.resize or 28
    net = feature_nets.ready_feature_net(cfg, SmallCNN(1, cfg.loss.feature_width))
    images = torch.rand(512, 1, size, size) * 2 - 1
    codes = cfg.arch_spec().codes
    labels = torch.arange(len(images)) % codes if codes else None
    stats = feature_stats(net.extract, images, labels=labels, num_classes=codes)
    model = build_model(cfg)
    return {"model": model, "extract": net.extract, "loss": client_loss(cfg, stats), "state": ClientState(),
            "scores": initial_scores(cfg, masked.num_maskable(model)), "batch": cfg.train.batch_size}  # fmt: skip


def time_local_steps(s: dict, steps: int, gen: torch.Generator) -> float:
    """Seconds per local step of a `step_setup` variant (at the variant's own batch)."""
    t0 = time.perf_counter()
    local_train(s["model"], s["scores"], s["loss"], s["extract"], state=s["state"],
                cfg=LocalConfig(steps, s["batch"]), generator=gen)  # fmt: skip
    return (time.perf_counter() - t0) / steps


def time_steps(overrides: list[str], steps: int, batch: int) -> dict:
    s, gen = step_setup(overrides, batch), torch.Generator().manual_seed(0)
    time_local_steps(s, 2, gen)  # warm-up
    return {"maskable_weights": masked.num_maskable(s["model"]), "ms_per_step": 1000 * time_local_steps(
        s, steps, gen)}  # fmt: skip


def time_interleaved(variants: dict[str, list[str]], steps: int, batch: int, repeats: int = 3,
                     conditional: bool = False) -> dict:  # fmt: skip
    """Best of `repeats` per variant, the variants taking turns, so that load on a shared machine hits
    every one alike; ratios are to the first variant."""
    setups = {name: step_setup(ov, batch, conditional) for name, ov in variants.items()}
    best = {name: float("inf") for name in variants}
    for rep in range(repeats):
        for name, s in setups.items():
            best[name] = min(best[name], time_local_steps(s, steps, torch.Generator().manual_seed(rep)))
    base = best[next(iter(variants))]
    return {name: {"maskable_weights": masked.num_maskable(setups[name]["model"]), "ms_per_step": 1000 * t,
                   "ratio": t / base} for name, t in best.items()}  # fmt: skip


def time_aggregation(n: int, clients: int = 10, repeats: int = 5) -> float:
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand(n, generator=gen) < 0.5 for _ in range(clients)]
    scores = torch.randn(n, generator=gen)
    t0 = time.perf_counter()
    for _ in range(repeats):
        counts = aggregate.count_masks(masks)
        proposal = aggregate.aggregate_scores(counts, len(masks))
        aggregate.blend(scores, proposal, aggregate.mada_lambda(scores, proposal, gen))
    return 1000 * (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default="")
    p.add_argument("--quality", action="store_true", help="time issue 12's demo variants instead (one thread)")
    p.add_argument("--modes", action="store_true", help="time issue 15's modes variants instead (one thread)")
    p.add_argument("--hour", action="store_true", help="time the one-hour candidates instead (two threads)")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.quality or a.modes or a.hour:
        torch.set_num_threads(2 if a.hour else 1)
        variants = QUALITY if a.quality else MODES if a.modes else HOUR
        steps = 8 if a.hour else 40
        for name, r in time_interleaved(variants, steps, 32, conditional=a.modes or a.hour).items():
            print(f"{name:<56} {r['ms_per_step']:6.1f} ms/step  x{r['ratio']:.2f}  ({r['maskable_weights']:,} weights)")
        return
    rows = {}
    for name, ov in ARCHS.items():
        r = time_steps(ov, a.steps, a.batch)
        r["aggregate_10_clients_ms"] = time_aggregation(r["maskable_weights"])
        rows[name] = r
        print(f"{name:<34} {r['maskable_weights']:>10,} weights  {r['ms_per_step']:8.1f} ms/step  "
              f"aggregate+MADA of 10 masks {r['aggregate_10_clients_ms']:7.1f} ms", flush=True)  # fmt: skip
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "batch": a.batch,
        "steps": a.steps,
        "rows": rows,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
