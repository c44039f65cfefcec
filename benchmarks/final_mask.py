"""Which mask should the exported model carry? The most likely mask against one sampled mask.

Both come from the same run's final global scores and are scored by the domain classifier the same
way (domain FID of --samples samples against as many test images, confident share, class histogram).

Run: .venv/bin/python benchmarks/final_mask.py runs/demo [--samples 5000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from prismfl import modelfile, rundir
from prismfl.eval.evaluate import score_images
from prismfl.fl import task
from prismfl.fl.methods.base import masked_final_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--samples", type=int, default=5000)
    args = p.parse_args()
    state = rundir.load_checkpoint(Path(args.run))
    cfg = rundir.checkpoint_config(state)
    scores = state["server"]["scores"]
    out = {}
    for kind in ("mode", "sample"):
        cfg.train.final_mask = kind
        model = masked_final_model(cfg, task.arch_spec(cfg), scores, 0, {})
        images = modelfile.sample(modelfile.materialize(model), args.samples)
        s = score_images(images, cfg.data.dataset, n_real=args.samples)
        out[kind] = {k: s[k] for k in ("domain_fid", "confident_share", "class_histogram")}
        print(kind, json.dumps(out[kind]))
    p_keep = torch.sigmoid(scores.double())
    print(f"weights with p within 0.1 of 0 or 1: {float(((p_keep - 0.5).abs() > 0.4).double().mean()):.3f}")


if __name__ == "__main__":
    main()
