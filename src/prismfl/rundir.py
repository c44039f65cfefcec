"""A run directory: start or check one, the round record, the checkpoint (no pickles), metrics.jsonl.

Every method and both transports (the in-process simulator and Flower) write the same layout:

    config.toml        the resolved RunConfig
    partition.txt      clients x classes
    checkpoint.safetensors   the state after the last finished round (safestate: tensors + JSON)
    metrics.jsonl      one RoundRecord per round; rewritten from the checkpoint on resume
    samples/round-NNNN.png, samples.png, curves.png, report.md, and the exported model(s)

A checkpoint holds the round records too, so metrics.jsonl always matches it after a resume.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from prismfl import safestate, schema
from prismfl.capabilities import METHODS
from prismfl.config import RunConfig
from prismfl.describe import describe, shown
from prismfl.errors import PrismError
from prismfl.files import MAX_CHECKPOINT_BYTES, atomic_write_bytes, read_capped

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # prismfl < 0.2: a pickle, never read (it could run code)
MAX_METRICS_BYTES = 1 << 30  # metrics.jsonl: a few hundred bytes a round
METRICS = "metrics.jsonl"
CONFIG = "config.toml"
CHECKPOINT_FORMAT = "prismfl-checkpoint"
CHECKPOINT_VERSION = 2


def config_toml(table: dict) -> str:
    import tomli_w

    return tomli_w.dumps(table)


# ---------------------------------------------------------------- the round record


@dataclass
class RoundRecord:
    round: int
    loss: float
    start_loss: float
    lam: float | None
    upload_bytes: int
    download_bytes: int
    bits_per_param: float
    entropy_bound_bits_per_param: float
    broadcast_bytes: int
    seconds: float
    client_seconds: float
    clients: list[int]
    mask_entropy: float
    epsilon: float | None  # privacy spent per client (one release at the start); None without privacy
    domain_fid: float | None = None  # quick domain FID of the round's model, every train.eval_every rounds

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["lambda"] = d.pop("lam")
        return d

    @staticmethod
    def schema(rnd: int, cfg: RunConfig, chosen: list[int]) -> schema.Node:
        """What to_dict wrote for round `rnd` of a run of `cfg` whose round chose the clients `chosen` (with
        the engine's `failures` and `rejected`), as a checkpoint holds it: metrics.jsonl, curves.png and
        report.md are rewritten from it on resume."""
        client = schema.Expect(num_clients=cfg.partition.num_clients).client
        count, share = schema.Int(0), schema.Num(0)
        private = not math.isinf(cfg.privacy.epsilon)
        mada = METHODS[cfg.train.method].mada and cfg.train.mada
        record = schema.Table(
            {"round": schema.Const(rnd, what=f"round {rnd} (the records are rounds 1, 2, ... in order)"),
             "loss": schema.Num(0, finite=False), "start_loss": schema.Num(0, finite=False),
             "lambda": schema.Num(0, 1) if mada else schema.Null(), "upload_bytes": count, "download_bytes": count,
             "bits_per_param": share, "entropy_bound_bits_per_param": share, "broadcast_bytes": count,
             "seconds": share, "client_seconds": share, "clients": schema.List(client, min_len=1, unique=True),
             "mask_entropy": schema.Num(0, 1), "epsilon": schema.Num(0, above=True) if private else schema.Null(),
             "domain_fid": schema.Num(0, finite=False) if due(cfg.train.eval_every, rnd, cfg.train.rounds) else
             schema.Null()},
            optional={"failures": schema.List(schema.Table({"client": client, "error": schema.Str()})),
                      "rejected": schema.List(schema.Table({"client": client, "why": schema.Str()}))},
            extra=schema.Json(), what=f"the record of round {rnd} (a table)")  # fmt: skip

        def took_part(r: dict, path: str) -> None:
            """The round's clients are those it chose but those that failed; only those are left out by a rule."""
            failed = {f["client"] for f in r.get("failures", [])}
            if not failed <= set(chosen):
                schema.fail(schema.join(path, "failures"), f"failures of the round's clients {chosen}",
                            got=f"clients {sorted(failed)}")  # fmt: skip
            want = [k for k in chosen if k not in failed]
            if r["clients"] != want:
                schema.fail(schema.join(path, "clients"), f"{want} (the round's clients {chosen}, without those "
                            "that failed)", got=str(r["clients"][:20]))  # fmt: skip
            left_out = {x["client"] for x in r.get("rejected", [])}
            if not left_out <= set(want):
                schema.fail(schema.join(path, "rejected"), f"uploads of the round's clients {want}",
                            got=f"clients {sorted(left_out)}")  # fmt: skip

        return schema.Each(record, took_part)


def due(every: int, rnd: int, last: int) -> bool:
    """Whether a periodic task (every `every` rounds, 0 = never) runs after round `rnd`; always after the last."""
    return bool(every) and (rnd % every == 0 or rnd == last)


# ---------------------------------------------------------------- checkpoint


def save_checkpoint(run_dir: Path, *, round_: int, cfg: RunConfig, transport: str, server: dict,
                    clients: dict | None, records: list[dict], model_info: dict) -> None:  # fmt: skip
    """The state after round `round_`: the method's server state, the clients' states where this
    process holds them (the simulator; None on Flower, whose clients keep their own), every record."""
    tree = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "round": round_, "config": cfg.to_dict(),
        "transport": transport, "server": server, "clients": clients, "records": records, "model_info": model_info,
    }  # fmt: skip
    atomic_write_bytes(run_dir / CHECKPOINT, safestate.to_bytes(tree), durable=False)


def is_run_dir(path: Path) -> bool:
    return (path / CHECKPOINT).is_file() or (path / LEGACY_CHECKPOINT).is_file()


def load_checkpoint(run_dir: Path) -> dict:
    """The checkpoint of a run directory, checked; a StateError (one line) for anything else."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    if not path.exists() and (run_dir / LEGACY_CHECKPOINT).exists():
        raise PrismError(f"{run_dir} was written by an older prismfl ({LEGACY_CHECKPOINT}, a pickle, which this "
                         "prismfl never reads because loading it could run code); train it again")  # fmt: skip
    what = str(path)
    data = read_capped(path, MAX_CHECKPOINT_BYTES, "checkpoint", safestate.StateError,
                       f"{run_dir} is not a prismfl run directory (no {CHECKPOINT})")  # fmt: skip
    return checked(safestate.from_bytes(data, what), what)


def checked(tree, what: str = "the checkpoint") -> dict:
    """A checkpoint's tree (safestate) of this format and version, with the top-level fields of one (one
    record per round done); else a StateError. What each field holds is checked where it is used: on
    resume, rundir.check_progress, Method.check_state and the transport's restore (fl.simulate.restore)."""
    schema.check(schema.Table({"format": schema.Str(), "version": schema.Int()}, what="a checkpoint (a table)"), tree)
    if tree["format"] != CHECKPOINT_FORMAT or tree["version"] != CHECKPOINT_VERSION:
        raise safestate.StateError(f"{what} is a {shown(tree['format'])} version "
                                   f"{describe(tree['version'])}; this prismfl reads {CHECKPOINT_FORMAT} "
                                   f"version {CHECKPOINT_VERSION}")  # fmt: skip
    table = schema.Table({}, what="a table")
    schema.check(schema.Table({"round": schema.Int(1, what="a round (an int >= 1)"), "config": table,
                               "transport": schema.Str(max_len=100), "server": table, "clients": schema.Opt(table),
                               "records": schema.List(), "model_info": table}), tree)  # fmt: skip
    n = tree["round"]
    schema.check(schema.List(length=n, what=f"a list of {n} round records (one per round done)"), tree["records"],
                 path="records")  # fmt: skip
    return tree


def checkpoint_config(state: dict) -> RunConfig:
    from prismfl.config import config_from_dict, without_retired

    try:  # (a checkpoint written before keys were retired holds them: at their kept values, it resumes)
        return config_from_dict(without_retired(state["config"]))
    except PrismError as exc:
        raise safestate.StateError(f"the checkpoint's configuration is not valid: {exc}") from None


def check_progress(state: dict, cfg: RunConfig) -> None:
    """What a resumed run takes from a checkpoint besides the method's and the clients' states: its round,
    every round's record and the model's info; a StateError (one line, naming the field) for anything
    that is not what a run of `cfg` writes. Before anything is written to the run directory."""
    from prismfl.fl.selection import select_clients

    rnd = state["round"]
    if not 1 <= rnd <= cfg.train.rounds:
        schema.check(schema.Int(1, cfg.train.rounds), rnd, path="round")
    for i, record in enumerate(state["records"]):
        schema.check(RoundRecord.schema(i + 1, cfg, select_clients(cfg, i + 1)), record, path=f"records[{i}]")
    json_table = schema.Table({}, extra=schema.Json())
    warm = {"warm_start": schema.Table({"steps": schema.Const(cfg.train.warm_start), "images": schema.Int(0),
                                        "loss": schema.Num(finite=False)}, optional={"source": schema.Str()},
                                       extra=schema.Json())} if cfg.train.warm_start else \
        {"warm_start": schema.Never("no warm start (train.warm_start = 0)")}  # fmt: skip
    private = json_table if not math.isinf(cfg.privacy.epsilon) else schema.Null()
    info = schema.Table({"method": schema.Const(cfg.train.method), "feature_net": json_table, "privacy": private},
                        optional=warm, extra=schema.Json())  # fmt: skip
    schema.check(info, state["model_info"], path="model_info")


def check(out: Path, cfg: RunConfig, *, resume: bool, transport: str) -> dict | None:
    """The checkpoint to resume from, or None for a fresh run; writes nothing.

    A directory that a run was started in but that has no checkpoint yet (killed in its first round)
    holds only what `start` wrote: it is started afresh with --resume and without it.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrismError(f"--out {out} is a file; choose a directory")
    if resume and (out / CHECKPOINT).exists():
        return resumable(load_checkpoint(out), cfg, transport, out)
    if resume and (out / LEGACY_CHECKPOINT).exists():
        load_checkpoint(out)  # raises: an old pickle checkpoint
    if resume and not (out.exists() and any(out.iterdir())):
        raise PrismError(f"--resume: no checkpoint in {out}; start a new run without --resume")
    if out.exists() and any(out.iterdir()) and not only_started(out):
        if resume:
            raise PrismError(f"--resume: no checkpoint in {out}; start a new run without --resume")
        raise PrismError(f"{out} is not empty; choose a new --out, or add --resume to continue that run")
    return None


def resumable(state: dict, cfg: RunConfig, transport: str, out: Path) -> dict:
    """A loaded checkpoint (`checked`) that a run of `cfg` on `transport` may resume: its configuration,
    its transport, its round, records and model info (`check_progress`); a PrismError otherwise."""
    if checkpoint_config(state).to_dict() != cfg.to_dict():  # keys added since are at their defaults
        raise PrismError(f"--resume: the configuration differs from the one {out} was started with")
    if state["transport"] != transport:
        raise PrismError(f"{out} was trained by the {shown(state['transport'])}; resume it there")
    check_progress(state, cfg)
    return state


STARTED = (CONFIG, "partition.txt", METRICS)


def only_started(out: Path) -> bool:
    """Whether `out` holds nothing but what `start` writes (a run killed before its first checkpoint)."""
    return all(p.name in STARTED or p.name.startswith(".") for p in out.iterdir())


def start(out: Path, cfg: RunConfig, class_table: str, source: str, log=print) -> None:
    """Create a run directory with its resolved config and the client x class table."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / CONFIG, config_toml(cfg.to_dict()).encode())
    atomic_write_bytes(out / "partition.txt", (class_table + "\n").encode())
    write_metrics(out, [])
    log(f"{cfg.partition.num_clients} clients, '{cfg.partition.scheme}' partition of {source}:")
    log(class_table)


# ---------------------------------------------------------------- metrics.jsonl


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    atomic_write_bytes(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in records).encode())


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; a torn last line (a kill mid-write) is left out."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in read_capped(path, MAX_METRICS_BYTES, "metrics", PrismError).decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            records.append(record)
    return records
