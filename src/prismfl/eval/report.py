"""`prismfl evaluate`: one fixed exported model, judged in the domain classifier's feature space."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from prismfl import modelfile
from prismfl.classifier import predict
from prismfl.data.sources import dataset_info, load_split, to_float
from prismfl.eval.classifier import domain_classifier
from prismfl.eval.metrics import fid_from_features
from prismfl.eval.quality import CONFIDENT, class_report


@lru_cache(maxsize=4)
def _reference(dataset: str, root: str | None, n: int):
    """Classifier, its metadata, and the embeddings of n held-out test images."""
    classifier, meta = domain_classifier(dataset, root, dataset_info(dataset).size)
    test = load_split(dataset, "test", root)
    with torch.no_grad():
        ref = _embed(classifier, to_float(test.images[:n]))
    return classifier, meta, ref, min(n, len(test))


@torch.no_grad()
def _embed(classifier, images: torch.Tensor, batch: int = 1000) -> np.ndarray:
    return torch.cat([classifier.embed(images[i : i + batch]) for i in range(0, len(images), batch)]).double().numpy()


def score_images(images: torch.Tensor, dataset: str, root: str | None = None, n_real: int = 10000) -> dict:
    """Domain FID against held-out test images, confident share and class histogram of `images`."""
    classifier, meta, ref, n_ref = _reference(dataset, root, n_real)
    info = dataset_info(dataset)
    size = info.size
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    report = class_report(predict(classifier, images), len(info.class_names))
    return {
        "domain_fid": fid_from_features(_embed(classifier, images), ref),
        **report,
        "protocol": {
            "domain_fid": f"Fréchet distance of the 128-d embedding of prismfl's {dataset} classifier, "
            f"{len(images)} generated vs {n_ref} test images (not Inception FID)",
            "classifier": f"EvalCNN trained on the {dataset} training split, test accuracy "
            f"{meta['test_accuracy']:.4f}, sha256 {meta['sha256'][:12]}",
            "confident": f"max class probability > {CONFIDENT}",
        },
    }


def evaluate_model(model: modelfile.PrismModel, n: int = 10000, seed: int = 0, root: str | None = None) -> dict:
    dataset = model.info.get("dataset", "fashion-mnist")
    images = modelfile.sample(modelfile.materialize(model), n, seed)
    result = score_images(images, dataset, root)
    result["protocol"]["model"] = "one fixed exported mask (the .prism file), not an ensemble of sampled masks"
    result["protocol"]["samples"] = n
    result["protocol"]["noise_seed"] = seed
    return {"dataset": dataset, "class_names": list(dataset_info(dataset).class_names), **result}
