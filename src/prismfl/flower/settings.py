"""How Flower's configuration maps onto prismfl's: run config -> RunConfig + server settings,
node config -> which client a SuperNode is and where its data lives.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, changed per run with
``flwr run . <connection> --run-config 'key=value ...'``):

    config-file      prismfl TOML file. A relative path is looked up in the working directory of the
                     process running the ServerApp (the SuperLink's), then in the app (FAB) directory.
    overrides        prismfl ``--set`` items separated by spaces: "train.rounds=5 seed=1"
    out-dir          run directory the ServerApp writes (relative: the SuperLink's working directory);
                     it must not exist yet or be empty
    min-replies      a round goes on with the uploads that arrived if at least this many did (at most
                     the number of clients chosen for the round); otherwise the run stops with an error
    reply-timeout    seconds the server waits for one round's replies (and for the setup replies)
    connect-timeout  seconds the server waits at the start until every client's SuperNode is connected
    resume           true: continue the run in out-dir from its checkpoint (clients start afresh)

The server sends its resolved RunConfig to every client, so clients need no config file. Node config
(``flower-supernode --node-config '...'``; the simulation engine sets the first two itself):

    partition-id     which of the config's clients this node is: 0 .. partition.num_clients - 1
    num-partitions   must equal partition.num_clients (a clear error otherwise)
    data-root        folder of the dataset on this node (default: the config's data.root, then the
                     usual places, see prismfl.data.sources)
    device           this node's train.device: cpu, cuda or auto (default: the config's)
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from prismfl.capabilities import METHODS
from prismfl.config import RunConfig, config_from_dict, load_config
from prismfl.errors import ConfigError

DEFAULT_RUN_CONFIG = {
    "config-file": "configs/smoke.toml",
    "overrides": "",
    "out-dir": "runs/flower",
    "min-replies": 1,
    "reply-timeout": 600.0,
    "connect-timeout": 120.0,
    "resume": False,
}


@dataclass(frozen=True)
class ServerSettings:
    cfg: RunConfig
    out: Path
    min_replies: int
    reply_timeout: float
    connect_timeout: float
    resume: bool = False


@dataclass(frozen=True)
class NodeSettings:
    partition_id: int
    num_partitions: int
    data_root: str | None = None
    device: str | None = None


def _app_dirs() -> list[Path]:
    """Directories on sys.path that hold a Flower app (Flower puts the installed FAB there)."""
    return [Path(p) for p in sys.path if p and (Path(p) / "pyproject.toml").is_file()]


def find_config_file(name: str) -> Path:
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, *(d / path for d in _app_dirs())]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"run config 'config-file' = {name!r} not found (looked in {', '.join(str(c.parent) for c in candidates)}); "
        "give an absolute path with flwr run --run-config 'config-file=\"/path/to/run.toml\"'"
    )


def _number(run_config: dict, key: str, kind, minimum) -> int | float:
    value = run_config.get(key, DEFAULT_RUN_CONFIG[key])
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"run config '{key}' must be {kind.__name__}, got {value!r}")
    if value < minimum or value <= 0:
        raise ConfigError(f"run config '{key}' must be {'> 0' if minimum == 0 else f'at least {minimum}'}, got {value}")
    return kind(value)


def server_settings(run_config: dict) -> ServerSettings:
    """Flower's run config -> the RunConfig every client will use, and the server's own settings."""
    unknown = sorted(set(run_config) - set(DEFAULT_RUN_CONFIG))
    if unknown:
        raise ConfigError(f"unknown run config key(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_RUN_CONFIG)}")
    overrides = run_config.get("overrides", "")
    if not isinstance(overrides, str):
        raise ConfigError(f"run config 'overrides' must be a string of key=value items, got {overrides!r}")
    try:
        items = shlex.split(overrides)
    except ValueError as exc:
        raise ConfigError(f"run config 'overrides' = {overrides!r} does not parse: {exc}") from None
    cfg = load_config(find_config_file(str(run_config.get("config-file", DEFAULT_RUN_CONFIG["config-file"]))), items)
    if cfg.faults != type(cfg.faults)():
        raise ConfigError("[faults] are injected by the in-process simulator only; on Flower the faults are real "
                          "(remove the [faults] settings)")  # fmt: skip
    if not cfg.public_images() and cfg.train.warm_start and METHODS[cfg.train.method].warm_start and \
            cfg.loss.features != "random":  # fmt: skip
        raise ConfigError("on Flower, a warm start without public images is trained at the server, which builds "
                          "the loss's feature net from the seed: it needs loss.features = 'random'")  # fmt: skip
    resume = run_config.get("resume", False)
    if not isinstance(resume, bool):
        raise ConfigError(f"run config 'resume' must be true or false, got {resume!r}")
    out = Path(str(run_config.get("out-dir", DEFAULT_RUN_CONFIG["out-dir"]))).expanduser()
    return ServerSettings(
        cfg=cfg,
        out=out if out.is_absolute() else Path.cwd() / out,
        min_replies=_number(run_config, "min-replies", int, 1),
        reply_timeout=_number(run_config, "reply-timeout", float, 0),
        connect_timeout=_number(run_config, "connect-timeout", float, 0),
        resume=resume,
    )


def node_settings(node_config: dict) -> NodeSettings:
    missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
    if missing:
        raise ConfigError(
            f"SuperNode node config lacks {' and '.join(missing)}: start it with "
            "--node-config 'partition-id=0 num-partitions=10' (one partition id per client of the config)"
        )
    values = {}
    for key in ("partition-id", "num-partitions"):
        value = node_config[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"node config '{key}' must be an integer, got {value!r}")
        values[key] = value
    data_root, device = node_config.get("data-root"), node_config.get("device")
    for key, value in (("data-root", data_root), ("device", device)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"node config '{key}' must be a string, got {value!r}")
    return NodeSettings(values["partition-id"], values["num-partitions"], data_root or None, device or None)


def client_config(cfg_dict: dict, node: NodeSettings) -> RunConfig:
    """The server's RunConfig with this node's data location and device; checks the node's partition."""
    cfg = config_from_dict(cfg_dict)
    k = cfg.partition.num_clients
    if node.num_partitions != k:
        raise ConfigError(
            f"node config num-partitions = {node.num_partitions} but the run has partition.num_clients = {k}: "
            f"start the SuperNodes with num-partitions={k} (or the simulation with {k} SuperNodes)"
        )
    if not 0 <= node.partition_id < k:
        raise ConfigError(f"node config partition-id = {node.partition_id} is outside 0..{k - 1}")
    data = dataclasses.replace(cfg.data, root=node.data_root) if node.data_root else cfg.data
    train = dataclasses.replace(cfg.train, device=node.device) if node.device else cfg.train
    return dataclasses.replace(cfg, data=data, train=train).validate()
