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
from dataclasses import dataclass
from pathlib import Path

from prismfl import safestate
from prismfl.config import RunConfig
from prismfl.errors import PrismError, read_file_bytes
from prismfl.files import atomic_write_bytes

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # prismfl < 0.2: a pickle, never read (it could run code)
METRICS = "metrics.jsonl"
CONFIG = "config.toml"
MODEL = "model.prism"
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
    data = read_file_bytes(path, safestate.StateError, f"{run_dir} is not a prismfl run directory (no {CHECKPOINT})")
    tree = safestate.from_bytes(data, what)
    safestate.require(tree, {"format": str, "version": int}, what)
    if tree["format"] != CHECKPOINT_FORMAT or tree["version"] != CHECKPOINT_VERSION:
        raise safestate.StateError(f"{what} is a {tree['format']} version {tree['version']}; this prismfl reads "
                                   f"{CHECKPOINT_FORMAT} version {CHECKPOINT_VERSION}")  # fmt: skip
    safestate.require(tree, {"round": int, "config": dict, "transport": str, "server": dict,
                             "clients": (dict, type(None)), "records": list, "model_info": dict}, what)  # fmt: skip
    if tree["round"] < 1 or len(tree["records"]) != tree["round"]:
        raise safestate.StateError(f"{what}: round {tree['round']} with {len(tree['records'])} records")
    return tree


def checkpoint_config(state: dict) -> RunConfig:
    from prismfl.config import config_from_dict

    try:
        return config_from_dict(state["config"])
    except PrismError as exc:
        raise safestate.StateError(f"the checkpoint's configuration is not valid: {exc}") from None


def check(out: Path, cfg: RunConfig, *, resume: bool, transport: str) -> dict | None:
    """The checkpoint to resume from, or None for a fresh run; writes nothing.

    A directory that a run was started in but that has no checkpoint yet (killed in its first round)
    holds only what `start` wrote: it is started afresh with --resume and without it.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrismError(f"--out {out} is a file; choose a directory")
    if resume and (out / CHECKPOINT).exists():
        state = load_checkpoint(out)
        if checkpoint_config(state).to_dict() != cfg.to_dict():  # keys added since are at their defaults
            raise PrismError(f"--resume: the configuration differs from the one {out} was started with")
        if state["transport"] != transport:
            raise PrismError(f"{out} was trained by the {state['transport']}; resume it there")
        return state
    if resume and (out / LEGACY_CHECKPOINT).exists():
        load_checkpoint(out)  # raises: an old pickle checkpoint
    if resume and not (out.exists() and any(out.iterdir())):
        raise PrismError(f"--resume: no checkpoint in {out}; start a new run without --resume")
    if out.exists() and any(out.iterdir()) and not only_started(out):
        if resume:
            raise PrismError(f"--resume: no checkpoint in {out}; start a new run without --resume")
        raise PrismError(f"{out} is not empty; choose a new --out, or add --resume to continue that run")
    return None


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
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            records.append(record)
    return records
