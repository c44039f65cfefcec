"""`prismfl evaluate`: one fixed exported model, judged by the domain classifier."""

from __future__ import annotations

import torch.nn.functional as F

from prismfl import modelfile
from prismfl.classifier import predict
from prismfl.data.sources import CLASS_NAMES
from prismfl.eval.classifier import domain_classifier
from prismfl.eval.quality import CONFIDENT, class_report

NATIVE_SIZE = {"fashion-mnist": 28, "mnist": 28}


def evaluate_model(model: modelfile.PrismModel, n: int = 10000, seed: int = 0, root: str | None = None) -> dict:
    dataset = model.info.get("dataset", "fashion-mnist")
    size = NATIVE_SIZE.get(dataset, model.spec.img_size)
    classifier, meta = domain_classifier(dataset, root, size)
    images = modelfile.sample(modelfile.materialize(model), n, seed)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    report = class_report(predict(classifier, images), len(CLASS_NAMES.get(dataset, range(10))))
    return {
        "protocol": {
            "model": "one fixed exported mask (the .prism file), not an ensemble of sampled masks",
            "samples": n,
            "noise_seed": seed,
            "classifier": f"prismfl EvalCNN trained on the {dataset} training split "
            f"(test accuracy {meta['test_accuracy']:.4f}, sha256 {meta['sha256'][:12]})",
            "confident": f"max class probability > {CONFIDENT}",
        },
        "dataset": dataset,
        "class_names": CLASS_NAMES.get(dataset),
        **report,
    }
