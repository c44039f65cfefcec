"""The `prismfl` commands on a trained model, a run directory or a model file: sample, export, info and
evaluate (registered on the app in cli.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from prismfl.cli_options import MAX_SAMPLES, MAX_SEED, check_range, output_kind
from prismfl.errors import PrismError


def _load_model(path: Path):
    """A PrismModel from a model file or a run directory (whose final state is exported on the fly)."""
    from prismfl import modelfile, rundir
    from prismfl.fl.engine import run_model

    if path.is_dir():
        if not rundir.is_run_dir(path):
            raise PrismError(f"{path} is not a prismfl run directory (no {rundir.CHECKPOINT})")
        return run_model(path)
    return modelfile.load(path)


def sample(
    source: Annotated[Path, typer.Argument(help="run directory or .prism model file")],
    n: Annotated[int, typer.Option("--n", help="number of images")] = 64,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG grid to write")] = Path("samples.png"),
    seed: Annotated[int, typer.Option("--seed", help="noise seed; same seed, same images")] = 0,
    class_: Annotated[
        str | None, typer.Option("--class", help="conditional models: only this class (name or index)")
    ] = None,
    per_class: Annotated[
        int | None, typer.Option("--per-class", help="conditional models: K images of every class, one row each")
    ] = None,
):
    """Sample images from a run or a model file into a PNG grid or an array file (.npy; .npz with labels)."""
    from prismfl import modelfile, plots

    check_range("--n", n, 1, MAX_SAMPLES)
    check_range("--seed", seed, 0, MAX_SEED)
    kind = output_kind(out, {".png": "a PNG grid", ".npy": "an array", ".npz": "an array"})
    model = _load_model(source)
    labels, nrow = _sample_labels(model, n, class_, per_class)
    images, labels = modelfile.sample_labelled(modelfile.materialize(model), n, seed, labels)
    if out.suffix.lower() == ".png":
        plots.save_grid(images, out, nrow=nrow)
    else:
        plots.save_array(images, out, labels)
    what = f"{len(images)} samples" + (f" of class {class_}" if class_ is not None else "")
    shape = ", (N, C, H, W) in [-1, 1]" + (" and labels" if labels is not None and kind == "an array" and
                                            out.suffix.lower() == ".npz" else "")  # fmt: skip
    typer.echo(f"wrote {what} to {out} ({kind}{shape if kind == 'an array' else ''})")


def _sample_labels(model, n: int, class_: str | None, per_class: int | None):
    """(labels to generate or None, grid row length) for `prismfl sample`'s --class and --per-class."""
    import torch

    from prismfl import modelfile
    from prismfl.data.sources import dataset_info

    classes = model.spec.num_classes
    if class_ is None and per_class is None:
        return None, None
    if not classes:
        raise PrismError("--class and --per-class need a class-conditional model (model.conditional = true)")
    if class_ is not None and per_class is not None:
        raise PrismError("give --class or --per-class, not both")
    if per_class is not None:
        if not 1 <= per_class * classes <= MAX_SAMPLES:
            raise PrismError(f"--per-class must be in 1..{MAX_SAMPLES // classes:,}, got {per_class}")
        return modelfile.per_class_labels(classes, per_class), per_class
    try:
        names = list(dataset_info(model.info.get("dataset", "")).class_names)
    except PrismError:
        names = []
    lookup = {name.lower(): i for i, name in enumerate(names)}
    if class_.lower() in lookup:
        index = lookup[class_.lower()]
    elif class_.isdigit() and int(class_) < classes:
        index = int(class_)
    else:
        known = ", ".join(names) if names else f"0..{classes - 1}"
        raise PrismError(f"--class {class_!r} is not a class of this model: {known} (or an index 0..{classes - 1})")
    return torch.full((n,), index, dtype=torch.long), None


def export(
    run: Annotated[Path, typer.Argument(help="run directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="model file to write")] = Path("model.prism"),
):
    """Export a run's final model: seed + architecture + packed mask, about N/8 bytes."""
    from prismfl import modelfile

    if not run.is_dir():
        raise PrismError(f"{run} is not a run directory")
    output_kind(out, {".prism": "a model file"})
    size = modelfile.save(_load_model(run), out)
    typer.echo(f"wrote {out} ({size:,} bytes)")


def info(source: Annotated[Path, typer.Argument(help="run directory, .prism model file or TOML config")]):
    """Layers, maskable-weight counts and provenance of a model, run or config."""
    import math

    from prismfl.model.generators import layer_shapes

    if source.suffix == ".toml":
        from prismfl.config import load_config

        spec, meta = load_config(source).arch_spec(), {}
    else:
        model = _load_model(source)
        spec, meta = model.spec, model.info
    table = layer_shapes(spec)  # no generator is built: the shapes are all info shows
    typer.echo(f"architecture {spec.name}: z_dim={spec.z_dim} width={spec.width} "
               f"channels={spec.channels} size={spec.img_size} seed={spec.weight_seed}"
               + (f" classes={spec.num_classes} (conditional)" if spec.num_classes else "")
               + (f" modes={spec.modes} per class" if spec.modes > 1 else ""))  # fmt: skip
    shares = getattr(model, "class_shares", None) if source.suffix != ".toml" else None
    if shares:
        per_class = [sum(shares[c * spec.modes : (c + 1) * spec.modes]) for c in range(spec.num_classes)]
        typer.echo("class shares: " + " ".join(f"{v:.3f}" for v in per_class))
    typer.echo(f"{'layer':<24} {'shape':<22} {'weights':>12}")
    for name, shape in table:
        typer.echo(f"{name:<24} {'x'.join(map(str, shape)):<22} {math.prod(shape):>12,}")
    n = sum(math.prod(shape) for _, shape in table)
    typer.echo(f"{'total maskable':<47} {n:>12,}  ({(n + 7) // 8:,} bytes packed)")
    if meta:
        typer.echo("info: " + json.dumps(meta, sort_keys=True))


def evaluate(
    source: Annotated[
        Path,
        typer.Argument(help="run directory, .prism model file, a FedAvg model.pt, or a reference: real, pca-gaussian"),
    ],
    n: Annotated[int, typer.Option("--n", help="number of generated samples")] = 10000,
    seed: Annotated[int, typer.Option("--seed", help="noise seed")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON file to write")] = None,
    data_root: Annotated[str | None, typer.Option("--data-root", help="folder of the dataset's files")] = None,
    inception: Annotated[
        str | None, typer.Option("--inception", help="Inception weights (pytorch-fid pt_inception or torchvision)")
    ] = None,
    ensemble: Annotated[
        bool, typer.Option("--ensemble", help="a fresh mask per 500 images, as the authors evaluated (run dirs)")
    ] = False,
    dataset: Annotated[str, typer.Option("--dataset", help="dataset of a reference row (real, pca-gaussian)")] = (
        "fashion-mnist"
    ),
    epsilon: Annotated[
        float, typer.Option("--epsilon", help="pca-gaussian only: release its statistics with this epsilon")
    ] = float("inf"),
    synthetic: Annotated[
        int | None,
        typer.Option(
            "--synthetic",
            help="labelled images to train on for train-on-synthetic accuracy "
            "(conditional models: 60000 unless set; references: 0 unless set; 0 skips)",
        ),
    ] = None,
):
    """Domain FID, precision/recall/density/coverage and class coverage of a model, with its protocol.

    The references `real` (training images) and `pca-gaussian` (a closed-form class-conditional
    sampler) are scored on the same protocol: they show where real and where trivial lie."""
    import math

    from prismfl.eval.evaluate import evaluate as run_evaluation
    from prismfl.eval.evaluate import evaluate_reference, format_table
    from prismfl.eval.references import REFERENCES

    check_range("--n", n, 2, MAX_SAMPLES)
    check_range("--seed", seed, 0, MAX_SEED)

    if not epsilon > 0:
        raise PrismError(f"--epsilon must be > 0, got {epsilon}")
    if not math.isinf(epsilon) and str(source) != "pca-gaussian":
        raise PrismError("--epsilon is for the pca-gaussian reference (a model's privacy is set when it is trained)")
    if synthetic is not None and not (synthetic == 0 or 2 <= synthetic <= MAX_SAMPLES):
        raise PrismError(f"--synthetic must be 0 or in 2..{MAX_SAMPLES:,}, got {synthetic}")
    reference = str(source) in REFERENCES and not source.exists()
    if not reference and not source.exists():
        raise PrismError(f"model file not found: {source} (give a run directory, a model file, or a reference: "
                         f"{', '.join(REFERENCES)})")  # fmt: skip
    if reference:  # an unknown dataset name is a DataError from the loader, before any work
        result = evaluate_reference(str(source), dataset, n=n, seed=seed, root=data_root, inception=inception,
                                    synthetic=synthetic or 0, epsilon=epsilon)  # fmt: skip
    else:
        result = run_evaluation(source, n=n, seed=seed, root=data_root, inception=inception, ensemble=ensemble,
                                **({} if synthetic is None else {"synthetic": synthetic}))  # fmt: skip
    typer.echo(format_table(result))
    if not reference and source.is_dir():  # the run keeps its evaluation, and its report shows it
        from prismfl.files import atomic_write_bytes
        from prismfl.runreport import run_report

        atomic_write_bytes(source / "evaluation.json", (json.dumps(result, indent=1) + "\n").encode())
        typer.echo(f"wrote {source / 'evaluation.json'} and {run_report(source)}")
    if out is not None:
        from prismfl.files import atomic_write_bytes

        atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())
        typer.echo(f"wrote {out}")
