"""`prismfl evaluate`: one fixed exported model, judged in the domain classifier's feature space.

Every number comes with its protocol: which classifier, how many generated and real images, which
model (one fixed exported mask, not an ensemble of sampled masks, unless asked).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prismfl import modelfile
from prismfl.capabilities import METHODS
from prismfl.data.sources import dataset_info, load_split, to_float
from prismfl.errors import PrismError
from prismfl.eval.classifier import PROTOCOL, domain_classifier
from prismfl.eval.metrics import fid_from_features
from prismfl.eval.quality import CONFIDENT, class_report
from prismfl.supervised import predict


@lru_cache(maxsize=4)
def _reference(dataset: str, root: str | None, n: int):
    """Classifier, its metadata, the embeddings of n held-out test images and their class shares."""
    classifier, meta = domain_classifier(dataset, root, dataset_info(dataset).size)
    test = load_split(dataset, "test", root)
    images = to_float(test.images[:n])
    ref = _embed(classifier, images)
    shares = np.bincount(test.labels[:n], minlength=len(dataset_info(dataset).class_names)) / min(n, len(test))
    return classifier, meta, ref, min(n, len(test)), shares, test.labels[:n]


@torch.no_grad()
def _embed(classifier, images: torch.Tensor, batch: int = 1000) -> np.ndarray:
    return torch.cat([classifier.embed(images[i : i + batch]) for i in range(0, len(images), batch)]).double().numpy()


def class_kl(generated_hist: list[int], real_shares: np.ndarray) -> float:
    """KL(generated class shares || real class shares), in nats; 0 when every class is hit in proportion."""
    p = np.asarray(generated_hist, dtype=np.float64)
    p /= p.sum()
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / real_shares[nz])).sum())


def score_images(images: torch.Tensor, dataset: str, root: str | None = None, n_real: int = 10000,
                 labels: torch.Tensor | None = None) -> dict:  # fmt: skip
    """Domain FID against held-out test images, PRDC, confident share and class coverage of `images`;
    with the classes they were generated for (`labels`), also the share the classifier agrees with and
    a domain FID per class (against the test images of that class)."""
    from prismfl.eval.prdc import prdc

    classifier, meta, ref, n_ref, shares, ref_labels = _reference(dataset, root, n_real)
    info = dataset_info(dataset)
    if images.shape[-1] != info.size:
        images = F.interpolate(images, size=(info.size, info.size), mode="bilinear", antialias=True,
                               align_corners=False)  # fmt: skip
    probs = predict(classifier, images)
    report = class_report(probs, len(info.class_names))
    fake = _embed(classifier, images)
    conditional = {}
    if labels is not None:
        y = labels.numpy()
        conditional = {
            "label_agreement": float((probs.argmax(1) == labels).float().mean()),
            "per_class_fid": [
                fid_from_features(fake[y == c], ref[ref_labels == c]) if (y == c).sum() > 1 else None
                for c in range(len(info.class_names))
            ],  # fmt: skip
        }
    return {
        "protocol_version": PROTOCOL,
        **conditional,
        "domain_fid": fid_from_features(fake, ref),
        **prdc(ref, fake, k=5),
        **report,
        "class_kl": class_kl(report["class_histogram"], shares),
        "protocol": {
            "version": f"{PROTOCOL} (figures of another version are not comparable)",
            "domain_fid": f"Fréchet distance in the 128-d embedding of prismfl's {dataset} classifier, "
            f"{len(images)} generated vs {n_ref} test images (a domain FID, not Inception FID)",
            "prdc": "precision/recall/density/coverage, k=5, same embedding and images",
            "classifier": f"EvalCNN trained on the {dataset} training split"
            f"{', ' + meta['weights'] if 'weights' in meta else ''}, test accuracy {meta['test_accuracy']:.4f}, "
            f"sha256 {meta['sha256'][:12]}",
            "confident": f"max class probability > {CONFIDENT}",
            "class_kl": "KL(generated class shares || test class shares), nats",
            **(
                {
                    "label_agreement": "share of samples the classifier puts in the class they were generated for",
                    "per_class_fid": "domain FID of each class's samples against the test images of that class",
                }
                if labels is not None
                else {}
            ),  # fmt: skip
        },
    }


QUICK_SAMPLES = 1000


def quick_fid(net: torch.nn.Module, dataset: str, root: str | None = None) -> float:
    """Domain FID of 1,000 samples (noise seed 0) against 2,000 test images: the training curve's number."""
    classifier, _, ref, _, _, _ = _reference(dataset, root, 2 * QUICK_SAMPLES)
    images = modelfile.sample(net, QUICK_SAMPLES, 0)
    size = dataset_info(dataset).size
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return fid_from_features(_embed(classifier, images), ref)


def load_generator(source: Path) -> tuple[torch.nn.Module, dict, int]:
    """(ready-to-sample generator, provenance info, model bytes) from a .prism file or a FedAvg .pt."""
    if source.suffix == ".pt":
        net, info = modelfile.load_dense(source)
        return net, info, info["bytes"]
    model = modelfile.load(source)
    return modelfile.materialize(model), model.info, source.stat().st_size


def _finish(images: torch.Tensor, dataset: str, *, root, inception, model_note: str, n: int, seed: int,
            labels: torch.Tensor | None = None, synthetic=None) -> dict:  # fmt: skip
    """The scores of `images`; `synthetic`: a labelled set (images, labels) to train on and test on real."""
    result = score_images(images, dataset, root, labels=labels)
    if synthetic is not None:
        from prismfl.eval.classifier import train_on_synthetic

        result.update(train_on_synthetic(*synthetic, dataset, root))
        result["protocol"]["train_on_synthetic"] = (
            f"the evaluation CNN trained from its seed on {len(synthetic[0]):,} generated labelled images "
            "(noise seed + 1) for its fixed schedule, no selection on real data; accuracy on the real test set, "
            "beside the same CNN trained on the real training split (real_accuracy)")  # fmt: skip
    if inception:
        from prismfl.eval.inception import inception_fid

        result["inception_fid"], result["protocol"]["inception_fid"] = inception_fid(inception, images, dataset, root)
    result["protocol"].update({"model": model_note, "samples": n, "noise_seed": seed})
    return {"dataset": dataset, "class_names": list(dataset_info(dataset).class_names), **result}


SYNTHETIC = 60000  # labelled images a conditional model generates for train-on-synthetic


def evaluate_file(source: Path, n: int = 10000, seed: int = 0, root: str | None = None,
                  inception: str | None = None, synthetic: int = SYNTHETIC) -> dict:  # fmt: skip
    """Evaluate one model file (.prism mask model, or a FedAvg baseline's .pt); a conditional model is
    also judged per class and by train-on-synthetic with `synthetic` generated images (0: not)."""
    net, info, size = load_generator(source)
    dataset = info.get("dataset", "fashion-mnist")
    images, labels = modelfile.sample_labelled(net, n, seed)
    train_set = modelfile.sample_labelled(net, synthetic, seed + 1) if labels is not None and synthetic else None
    note = f"one fixed exported model ({source.name}), not an ensemble of sampled masks"
    return {
        "model_bytes": size,
        "conditional": labels is not None,
        **_finish(
            images,
            dataset,
            root=root,
            inception=inception,
            model_note=note,
            n=n,
            seed=seed,
            labels=labels,
            synthetic=train_set,
        ),  # fmt: skip
    }


def evaluate_reference(name: str, dataset: str, *, n: int = 10000, seed: int = 0, root: str | None = None,
                       inception: str | None = None, synthetic: int = 0, epsilon: float = math.inf,
                       delta: float = 1e-5) -> dict:  # fmt: skip
    """Evaluate a reference sampler (eval/references.py) on the same protocol as any model; both are
    class-conditional, so `synthetic` > 0 also trains on that many of their labelled images."""
    from prismfl.eval.references import reference_images

    if synthetic and not math.isinf(epsilon):  # one release: the training set comes from the same fit
        both, labels_both = reference_images(name, dataset, n + synthetic, seed, root, epsilon, delta)
        images, labels, train_set = both[:n], labels_both[:n], (both[n:], labels_both[n:])
    else:
        images, labels = reference_images(name, dataset, n, seed, root, epsilon, delta)
        train_set = reference_images(name, dataset, synthetic, seed + 1, root) if synthetic else None
    notes = {"real": f"{len(images)} training images (seeded draw), not a model",
             "pca-gaussian": "per-class Gaussian in the top principal components of the training images"}  # fmt: skip
    if not math.isinf(epsilon):
        notes[name] = (f"per-class Gaussian in the top principal components, released once with ({epsilon:g}, "
                       f"{delta:g})-DP (eval.references.dp_pca_gaussian)")  # fmt: skip
    result = _finish(images, dataset, root=root, inception=inception, model_note=notes[name], n=len(images),
                     seed=seed, labels=labels, synthetic=train_set)  # fmt: skip
    return {"method": name, "epsilon": epsilon, **result}


def evaluate(source: Path, *, n: int = 10000, seed: int = 0, root: str | None = None,
             inception: str | None = None, ensemble: bool = False, synthetic: int = SYNTHETIC) -> dict:  # fmt: skip
    """Evaluate a model file or a run directory (whatever its method)."""
    if not source.is_dir():
        if ensemble:
            raise PrismError("--ensemble needs a run directory: it samples fresh masks from the global probabilities")
        return evaluate_file(source, n, seed, root, inception, synthetic)
    from prismfl import rundir

    if not rundir.is_run_dir(source):
        raise PrismError(f"{source} is not a prismfl run directory (no {rundir.CHECKPOINT})")
    state = rundir.load_checkpoint(source)
    cfg = rundir.checkpoint_config(state)
    method, caps = cfg.train.method, METHODS[cfg.train.method]  # caps.model: where the method wrote its model
    if caps.per_client():  # every client's own model, each judged alone; the best one is the headline
        paths = [source / caps.model.format(k=k) for k in range(cfg.partition.num_clients)]
        per_client = [evaluate_file(p, n, seed, root, inception, synthetic=0) for p in paths]
        best = int(np.argmin([r["domain_fid"] for r in per_client]))
        headline = evaluate_file(paths[best], n, seed, root, inception, synthetic) if synthetic else per_client[best]
        return {"method": method, **headline, "best_client": best,
                "mean_domain_fid": float(np.mean([r["domain_fid"] for r in per_client])),
                "per_client": [{"client": k, "domain_fid": r["domain_fid"], "class_kl": r.get("class_kl")}
                               for k, r in enumerate(per_client)]}  # fmt: skip
    if not ensemble:
        return {"method": method, **evaluate_file(source / caps.model, n, seed, root, inception, synthetic)}
    from prismfl.fl import aggregate
    from prismfl.seeds import generator_for

    scores = state["server"].get("scores")
    if scores is None:
        raise PrismError(f"--ensemble needs one set of global probabilities; a {method} run has none")
    spec, batches = cfg.arch_spec(), []
    if spec.num_classes:
        raise PrismError("--ensemble is for unconditional models; evaluate a conditional run's model file")
    gen = torch.Generator().manual_seed(seed)
    for i, start in enumerate(range(0, n, 500)):
        mask = aggregate.sample_mask(scores, generator_for(seed, "ensemble", i))
        net = modelfile.materialize(modelfile.PrismModel(spec, mask))
        z = torch.randn(min(500, n - start), net.z_dim, generator=gen)
        with torch.no_grad():
            batches.append(net(z))
    note = "an ensemble: a fresh mask drawn from the final global probabilities for every 500 images (the authors')"
    return {
        "method": method,
        **_finish(
            torch.cat(batches), cfg.data.dataset, root=root, inception=inception, model_note=note, n=n, seed=seed
        ),
    }


def format_table(result: dict) -> str:
    """The headline numbers as a small table, each with its protocol line underneath."""
    rows = [("domain FID", "domain_fid"), ("precision", "precision"), ("recall", "recall"), ("density", "density"),
            ("coverage", "coverage"), ("confident share", "confident_share"), ("class KL", "class_kl"),
            ("inception FID", "inception_fid"), ("label agreement", "label_agreement"),
            ("train-on-synth", "tstr_accuracy"), ("train-on-real", "real_accuracy")]  # fmt: skip
    lines = [f"{'metric':<16} {'value':>10}   ({result.get('protocol_version', 'protocol v1')})"]
    lines += [f"{label:<16} {result[key]:>10.4f}" for label, key in rows if key in result]
    names = result.get("class_names") or [str(i) for i in range(len(result["class_histogram"]))]
    hist = "  ".join(f"{name}:{count}" for name, count in zip(names, result["class_histogram"]))
    lines.append(f"classes          {hist}")
    if result.get("per_class_fid"):
        fids = "  ".join(
            f"{name}:{'-' if v is None else f'{v:.1f}'}" for name, v in zip(names, result["per_class_fid"])
        )
        lines.append(f"FID per class    {fids}")
    if result.get("tstr_per_class"):
        accs = "  ".join(f"{name}:{v:.2f}" for name, v in zip(names, result["tstr_per_class"]))
        lines.append(f"synth acc/class  {accs}")
    lines += [f"  {key}: {text}" for key, text in result["protocol"].items()]
    return "\n".join(lines)
