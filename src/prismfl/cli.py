"""The `prismfl` command. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from prismfl.capabilities import METHODS
from prismfl.configcheck import show_number
from prismfl.errors import PrismError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated generative models from binary masks (PRISM)."
)


def _fail(message: str) -> None:
    typer.echo(f"prismfl: error: {message}", err=True)
    sys.exit(2)


MAX_SAMPLES = 100_000  # images one command generates (sample --n, evaluate --n and --synthetic, grid --samples)
MAX_SEED = 2**63 - 1  # a noise seed, as a config's seed: in [0, 2^63)
MAX_CLIENTS = 65_535  # privacy --secagg, as partition.num_clients


def _check_range(option: str, value: int, low: int, high: int) -> None:
    """Refuse an integer option outside low..high with one line naming it (before any work is done)."""
    if not low <= value <= high:
        raise PrismError(f"{option} must be in {low:,}..{high:,}, got {show_number(value)}")


def _output_kind(out: Path, kinds: dict[str, str]) -> str:
    """What an --out path will hold, by its extension; a directory or another extension is refused."""
    if out.is_dir():
        raise PrismError(f"--out {out} is a directory; give a file name ending in {' or '.join(kinds)}")
    kind = kinds.get(out.suffix.lower())
    if kind is None:
        raise PrismError(
            f"--out {out}: write {' or '.join(kinds)} files (by the extension), not {out.suffix or 'none'}"
        )
    return kind


def _load_model(path: Path):
    """A PrismModel from a model file or a run directory (whose final state is exported on the fly)."""
    from prismfl import modelfile, rundir
    from prismfl.fl.engine import run_model

    if path.is_dir():
        if not rundir.is_run_dir(path):
            raise PrismError(f"{path} is not a prismfl run directory (no {rundir.CHECKPOINT})")
        return run_model(path)
    return modelfile.load(path)


@app.command()
def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML run configuration")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory to write")] = Path("runs/latest"),
    set_: Annotated[list[str], typer.Option("--set", help="override a config key: --set train.rounds=5")] = [],  # noqa: B006
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its checkpoint")] = False,
    method: Annotated[str | None, typer.Option("--method", help="prism, fedavg, local, central or public")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
):
    """Train a federation in one process and write metrics, checkpoints, grids and model.prism."""
    from prismfl.config import load_config
    from prismfl.fl.simulate import train as run_training
    from prismfl.progress import set_enabled

    set_enabled(not quiet)
    cfg = load_config(config, set_ + ([f'train.method="{method}"'] if method else []))
    run_training(cfg, out, resume=resume)


@app.command()
def features(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML run configuration")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a config key")] = [],  # noqa: B006
):
    """Build (or check) the loss's feature network for a config and say what it was trained on."""
    from prismfl.config import load_config
    from prismfl.data.federation import prepare_federation
    from prismfl.loss.feature_nets import build_feature_net

    cfg = load_config(config, set_)
    fed = prepare_federation(cfg)
    _, meta, _ = build_feature_net(cfg, fed)
    typer.echo(json.dumps(meta, indent=1))


@app.command()
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

    _check_range("--n", n, 1, MAX_SAMPLES)
    _check_range("--seed", seed, 0, MAX_SEED)
    kind = _output_kind(out, {".png": "a PNG grid", ".npy": "an array", ".npz": "an array"})
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


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="run directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="model file to write")] = Path("model.prism"),
):
    """Export a run's final model: seed + architecture + packed mask, about N/8 bytes."""
    from prismfl import modelfile

    if not run.is_dir():
        raise PrismError(f"{run} is not a run directory")
    _output_kind(out, {".prism": "a model file"})
    size = modelfile.save(_load_model(run), out)
    typer.echo(f"wrote {out} ({size:,} bytes)")


@app.command()
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


@app.command()
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

    _check_range("--n", n, 2, MAX_SAMPLES)
    _check_range("--seed", seed, 0, MAX_SEED)

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


@app.command()
def privacy(
    epsilon: Annotated[float, typer.Option("--epsilon", help="target epsilon per client")],
    delta: Annotated[float, typer.Option("--delta", help="target delta")] = 1e-5,
    layers: Annotated[
        int, typer.Option("--layers", help="feature layers released (8 for the demo: 7 without loss.class_term)")
    ] = 8,
    images: Annotated[int, typer.Option("--images", help="images a client holds, to show the noise on a mean")] = 5500,
    means_only: Annotated[
        bool, typer.Option("--means-only", help="loss.moment = 'mean': only the means are released")
    ] = False,
    secagg: Annotated[
        int, typer.Option("--secagg", help="privacy.secagg with this many clients: each adds a share of the noise")
    ] = 0,
    colluders: Annotated[int, typer.Option("--colluders", help="privacy.colluders, with --secagg")] = 0,
    audit: Annotated[
        int, typer.Option("--audit", help="also attack the real release with this many canary trials each way")
    ] = 0,
):
    """Print the Gaussian noise prismfl would add to each client's feature statistics; with --audit, an
    empirical lower bound on epsilon from a canary attack on the implementation (prismfl/audit.py)."""
    import math

    from prismfl.privacy import noise_multiplier, spent_epsilon

    _check_range("--images", images, 1, 10**12)
    _check_range("--layers", layers, 1, 10_000)
    _check_range("--secagg", secagg, 0, MAX_CLIENTS)
    _check_range("--colluders", colluders, 0, max(secagg - 1, 0))  # fewer than the clients of --secagg
    _check_range("--audit", audit, 0, 10**7)
    if audit and means_only:
        raise PrismError("--audit attacks the release of means and second moments, not --means-only")
    z = noise_multiplier(epsilon, delta)
    sens = math.sqrt((1 if means_only else 2) * layers + 1)
    typer.echo("mechanism        Gaussian, one release of clipped feature sums per client (docs/privacy.md)")
    typer.echo(f"noise multiplier {z:.4f}   (analytic Gaussian calibration, dp-accounting)")
    typer.echo(
        f"sensitivity      {sens:.4f}   (sqrt({1 if means_only else 2} x {layers} layers + 1), clip-normalised L2)"
    )
    typer.echo(f"noise std        {z * sens:.4f}   per coordinate of the released sums, in clip units")
    typer.echo(f"on a mean        {z * sens / images:.6f}   per coordinate for a client of {images} images")
    typer.echo(f"guarantee        epsilon={spent_epsilon(z, delta):.4f}, delta={delta:g} per client, record-level")
    if secagg:
        share = z * sens / math.sqrt(secagg - colluders)
        total = share * math.sqrt(secagg)
        typer.echo(f"secure sum       each of {secagg} clients adds std {share:.4f}; the server sees only the sum, "
                   f"std {total:.4f} >= {z * sens:.4f} even with {colluders} colluding clients")  # fmt: skip
    if audit:
        from prismfl.audit import audit as run_audit

        got = run_audit(audit, epsilon=epsilon, delta=delta, secagg=secagg, layers=layers)
        what = f"the secure sum of {secagg} releases" if secagg else "one release"
        typer.echo(f"audit            epsilon >= {got.lower_bound:.3f} with {got.confidence:.0%} confidence: a canary "
                   f"attack on {what}, {got.trials:,} trials with and without it")  # fmt: skip
        if got.lower_bound > epsilon:
            raise PrismError(f"the audit's lower bound {got.lower_bound:.3f} exceeds the claimed epsilon {epsilon:g}: "
                             "the release leaks more than its accountant says")  # fmt: skip


@app.command()
def grid(
    config: Annotated[Path, typer.Option("--config", "-c", help="base TOML configuration of every cell")],
    datasets: Annotated[str, typer.Option(help="comma-separated")] = "fashion-mnist",
    partitions: Annotated[str, typer.Option(help="comma-separated: iid, shards, dirichlet")] = "shards,iid",
    methods: Annotated[str, typer.Option(help="comma-separated")] = "prism,prism-nomada,fedavg,local,central",
    seeds: Annotated[str, typer.Option(help="comma-separated")] = "0,1,2",
    set_: Annotated[list[str], typer.Option("--set", help="override for every cell")] = [],  # noqa: B006
    out: Annotated[Path, typer.Option("--out", help="root of the cells' run directories")] = Path("runs/grid"),
    report: Annotated[Path, typer.Option("--report", help="Markdown results to write")] = Path("runs/grid/results.md"),
    samples: Annotated[int, typer.Option("--samples", help="generated images per evaluation")] = 10000,
    report_only: Annotated[bool, typer.Option("--report-only", help="report finished cells only")] = False,
):
    """Run datasets x partitions x methods x seeds, then write a results table and curves (resumable)."""
    import datetime
    import platform

    from prismfl import grid as grid_mod
    from prismfl.progress import set_enabled

    set_enabled(True)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    try:
        seed_list = [int(x) for x in split(seeds)]
    except ValueError:
        raise PrismError(f"--seeds must be comma-separated integers, got {seeds[:100]!r}") from None
    for seed in seed_list:
        _check_range("--seeds", seed, 0, MAX_SEED)
    _check_range("--samples", samples, 2, MAX_SAMPLES)
    cells = grid_mod.cells(split(datasets), split(partitions), split(methods), seed_list)
    known = [*METHODS, *grid_mod.VARIANTS]
    for m in {c.method for c in cells}:
        if m not in known:
            raise PrismError(f"unknown method {m!r}; expected {', '.join(known[:-1])} or {known[-1]}")
    if report_only:
        results = grid_mod.finished(cells, out)
        if not results:
            raise PrismError(f"--report-only: no finished cell of this grid under {out}")
        typer.echo(f"{len(results)} of {len(cells)} cells finished")
    else:
        results = grid_mod.run_grid(cells, str(config), set_, out, samples=samples)
    argv = " ".join(sys.argv[1:])
    header = (f"Produced by `prismfl {argv}` on {datetime.date.today().isoformat()}, "
              f"{platform.machine()} CPU ({__import__('os').cpu_count()} cores).")  # fmt: skip
    from prismfl.files import atomic_write_bytes

    atomic_write_bytes(report, grid_mod.results_markdown(results, header).encode())
    grid_mod.plot_curves(results, report.with_suffix(".png"))
    typer.echo(f"wrote {report} and {report.with_suffix('.png')}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except PrismError as exc:
        _fail(str(exc))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted; resume with --resume", err=True)
        sys.exit(130)
    except OSError as exc:  # a path that cannot be written or read: not a directory, read-only, no space
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}")
    except MemoryError:
        _fail("out of memory: lower the sizes (model.width, train.batch_size, --n)")
    except Exception as exc:  # click's usage errors
        import click

        if isinstance(exc, click.exceptions.NoArgsIsHelpError):
            exc.show()  # the help text
            sys.exit(2)
        if isinstance(exc, click.ClickException):  # a usage error: one line, as every other error
            where = exc.ctx.command_path if getattr(exc, "ctx", None) else "prismfl"
            message = " ".join(exc.format_message().split())  # the value it quotes may be huge: cut
            _fail((message if len(message) <= 200 else message[:200] + "...") + f" (see '{where} --help')")
        raise


if __name__ == "__main__":
    main()
