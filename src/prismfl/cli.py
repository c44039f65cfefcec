"""The `prismfl` command: its entry point, where every user error becomes one line on stderr and exit code 2,
and the commands that train (train, features, grid) or account for privacy (privacy); the commands on a
trained model are cli_models.py, the option limits cli_options.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from prismfl.capabilities import METHODS
from prismfl.cli_models import evaluate, export, info, sample
from prismfl.cli_options import MAX_CLIENTS, MAX_SAMPLES, MAX_SEED, check_range
from prismfl.errors import PrismError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated generative models from binary masks (PRISM)."
)


def _fail(message: str) -> None:
    typer.echo(f"prismfl: error: {message}", err=True)
    sys.exit(2)


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


for command in (sample, export, info, evaluate):  # the commands on a trained model: cli_models.py
    app.command()(command)


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

    check_range("--images", images, 1, 10**12)
    check_range("--layers", layers, 1, 10_000)
    check_range("--secagg", secagg, 0, MAX_CLIENTS)
    check_range("--colluders", colluders, 0, max(secagg - 1, 0))  # fewer than the clients of --secagg
    check_range("--audit", audit, 0, 10**7)
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
        check_range("--seeds", seed, 0, MAX_SEED)
    check_range("--samples", samples, 2, MAX_SAMPLES)
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
