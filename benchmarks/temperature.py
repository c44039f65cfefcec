"""Screen a conditional run's samples drawn with the noise z scaled by T (T > 1: more spread), on the
screens' protocol of docs/quality.md: domain FID, recall and label agreement of `--n` samples against the
10,000 test images, and train on synthetic with `--synthetic` generated labelled images. T = 1 is the
model as `prismfl evaluate RUN --n N --synthetic S` samples it (the same seeds: 0 for the judged
samples, 1 for the training set).

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/temperature.py runs/demo --temps 1.0,1.4,1.8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prismfl import modelfile, rundir
from prismfl.eval.classifier import train_on_synthetic
from prismfl.eval.evaluate import score_images


def scaled_sample(net, n: int, seed: int, temperature: float):
    """modelfile.sample_labelled with every z scaled by `temperature` (the labels are drawn as there)."""
    return modelfile.sample_labelled(net, n, seed, temperature=temperature)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--temps", default="1.0,1.4,1.8")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--synthetic", type=int, default=20000)
    a = p.parse_args()
    net = modelfile.materialize(modelfile.load(a.run / rundir.MODEL))
    if not net.num_classes:
        raise SystemExit("a conditional model is needed: train on synthetic needs labels")
    for temperature in (float(t) for t in a.temps.split(",")):
        start = time.time()
        train_images, train_labels = scaled_sample(net, a.synthetic, 1, temperature)
        images, labels = scaled_sample(net, a.n, 0, temperature)
        scores = score_images(images, "fashion-mnist", labels=labels)
        tstr = train_on_synthetic(train_images, train_labels, "fashion-mnist")
        row = {"run": str(a.run), "temperature": temperature, "domain_fid": scores["domain_fid"],
               "recall": scores["recall"], "label_agreement": scores.get("label_agreement"),
               "tstr_accuracy": tstr["tstr_accuracy"], "tstr_per_class": tstr["tstr_per_class"],
               "seconds": round(time.time() - start)}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
