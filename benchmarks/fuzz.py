"""Fuzz campaign over every decoder of untrusted bytes: mutated and random inputs, each classified as

    clean error   the decoder's own error type (WireError, ModelFileError, StateError, ConfigError)
    wrong accept  accepted, but not a well-formed input: a message that does not re-encode to the very
                  bytes received (the wire format is canonical), a model file whose mask does not fit
                  its architecture or that does not sample, a checkpoint or config that is not usable
    crash         any other exception (a panic of a library included)
    hang          no answer within 5 seconds

Run: .venv/bin/python benchmarks/fuzz.py --n 10000 --json docs/benchmarks/fuzz.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import signal
import struct
import tempfile
import time
import zlib
from pathlib import Path

import torch

from prismfl import modelfile, rundir, safestate
from prismfl.config import RunConfig, load_config
from prismfl.errors import ConfigError, ModelFileError
from prismfl.fl import aggregate, wire
from prismfl.model import masked
from prismfl.model.generators import ArchSpec, build_generator

N = 300
TABLE = wire.layer_table_hash([("w", (N,))])
SCORES = torch.randn(N, generator=torch.Generator().manual_seed(0)) * 2
STATE_N = 3000  # a state large enough for its range-coded form (coder 5) to be the smaller
STATE = (torch.randn(STATE_N, generator=torch.Generator().manual_seed(3)) * 10).clamp(-4.6, 4.6)
CODER_NAMES = {wire.CODER_PACKED: "packed", wire.CODER_BERNOULLI: "range", wire.CODER_CALIBRATED: "calibrated"}


class Hang(Exception):
    pass


def reseal_wire(data: bytes) -> bytes:
    if len(data) < wire.HEADER.size:
        return data
    head, payload = bytearray(data[: wire.HEADER.size]), data[wire.HEADER.size :]
    struct.pack_into("<I", head, 28, len(payload))
    head = bytes(head[: wire.CRC_AT])
    return head + zlib.crc32(payload, zlib.crc32(head)).to_bytes(4, "little") + payload


def reseal_model(data: bytes) -> bytes:
    return data[:-32] + hashlib.sha256(data[:-32]).digest() if len(data) > 32 else data


def mutate(seed: bytes, rng: random.Random, reseal) -> bytes:
    """One of: random bytes; byte edits; a cut or an extension; header words set to edge values;
    each but the first with its checksum recomputed (an attacker's input) half of the time."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 2 * len(seed)))
    data = bytearray(seed)
    if kind == 1:
        for _ in range(rng.randrange(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 2:
        cut = rng.randrange(len(data))
        data = data[:cut] if rng.random() < 0.5 else data + rng.randbytes(rng.randrange(1, 64))
    else:
        for _ in range(rng.randrange(1, 3)):
            at = rng.randrange(0, max(1, min(len(data), 64) - 4))
            value = rng.choice([0, 1, 0xFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, rng.randrange(2**32)])
            struct.pack_into("<I", data, at, value)
    data = bytes(data)
    return reseal(data) if rng.random() < 0.5 else data


# ---------------------------------------------------------------- targets: (seeds, check(data) -> "ok" | "wrong")


def wire_target(kind: str):
    mask = aggregate.sample_mask(SCORES, torch.Generator().manual_seed(1))
    counts = torch.randint(0, 4, (N,), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    seeds = {
        "upload": [wire.encode_upload(mask, SCORES, round_=2, table_hash=TABLE, client=5, coder=c)
                   for c in ("packed", "range", "calibrated")],
        "delta": [wire.encode_delta(counts, 3, lam, 0.01, SCORES, round_=2, table_hash=TABLE) for lam in (None, 0.3)],
        "state": [wire.encode_state(STATE, round_=2, table_hash=TABLE),
                  wire.encode_state(STATE, round_=2, table_hash=TABLE, coder="auto")],
    }[kind]  # fmt: skip

    def check(data: bytes) -> str:
        if kind == "upload":
            got = wire.decode_upload(data, SCORES, round_=2, table_hash=TABLE, client=5)
            again = wire.encode_upload(got, SCORES, round_=2, table_hash=TABLE, client=5, coder=CODER_NAMES[data[6]])
        elif kind == "delta":
            d = wire.decode_delta(data, SCORES, round_=2, table_hash=TABLE)
            again = wire.encode_delta(d.counts, d.m, d.lam, d.smoothing, SCORES, round_=2, table_hash=TABLE)
        else:
            rnd, values = wire.decode_state(data, num_weights=STATE_N, table_hash=TABLE)
            coder = "auto" if data[6] == wire.CODER_PLANES else "float32"
            again = wire.encode_state(values, round_=rnd, table_hash=TABLE, coder=coder)
        return "ok" if again == data else "wrong"

    return seeds, check, reseal_wire, wire.WireError


def model_target():
    spec = ArchSpec("mlp", 4, 8, 1, 28, weight_seed=3)
    n = masked.num_maskable(build_generator(spec))
    masks = [torch.rand(n, generator=torch.Generator().manual_seed(s)) < 0.5 for s in range(2)]
    seeds = [modelfile.to_bytes(modelfile.PrismModel(spec, m, {"dataset": "fashion-mnist"})) for m in masks]

    def check(data: bytes) -> str:
        model = modelfile.from_bytes(data)
        if model.mask.numel() != masked.num_maskable(build_generator(model.spec)):
            return "wrong"
        images = modelfile.sample(modelfile.materialize(model), 2)
        return "ok" if torch.isfinite(images).all() else "wrong"

    return seeds, check, reseal_model, ModelFileError


def checkpoint_target(tmp: Path):
    cfg = RunConfig().validate()
    rundir.save_checkpoint(tmp, round_=1, cfg=cfg, transport="simulator", server={"scores": SCORES, "synced": [0]},
                           clients=None, records=[{"round": 1, "loss": 1.0}], model_info={})  # fmt: skip
    seeds = [(tmp / rundir.CHECKPOINT).read_bytes()]

    def check(data: bytes) -> str:
        (tmp / rundir.CHECKPOINT).write_bytes(data)
        state = rundir.load_checkpoint(tmp)
        rundir.checkpoint_config(state)
        return "ok" if len(state["records"]) == state["round"] else "wrong"

    return seeds, check, lambda d: d, (safestate.StateError, ConfigError)


def config_target(tmp: Path):
    root = Path(__file__).resolve().parents[1] / "configs"
    seeds = [(root / name).read_bytes() for name in ("smoke.toml", "fmnist-noniid.toml", "paper-fmnist.toml")]

    def check(data: bytes) -> str:
        (tmp / "c.toml").write_bytes(data)
        cfg = load_config(tmp / "c.toml")
        from prismfl.fl.task import arch_spec

        arch_spec(cfg).validate()
        return "ok"

    return seeds, check, lambda d: d, ConfigError


# each target gets a scratch directory for the files its decoder reads, removed after its campaign
TARGETS = {"upload": lambda _: wire_target("upload"), "delta": lambda _: wire_target("delta"),
           "state": lambda _: wire_target("state"), "model file": lambda _: model_target(),
           "checkpoint": checkpoint_target, "config": config_target}  # fmt: skip


def campaign(name: str, n: int, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory(prefix="prismfl-fuzz-") as tmp:
        return _campaign(TARGETS[name](Path(tmp)), name, n, seed)


def _campaign(target, name: str, n: int, seed: int) -> dict:
    seeds, check, reseal, clean = target
    rng = random.Random(f"{seed}:{name}")
    counts = {"tried": 0, "accepted": 0, "clean error": 0, "wrong accept": 0, "crash": 0, "hang": 0}
    examples: dict[str, str] = {}

    def on_alarm(*_):
        raise Hang

    signal.signal(signal.SIGALRM, on_alarm)
    t0 = time.perf_counter()
    for _ in range(n):
        data = mutate(rng.choice(seeds), rng, reseal)
        counts["tried"] += 1
        signal.alarm(5)
        try:
            outcome = {"ok": "accepted", "wrong": "wrong accept"}[check(data)]
        except Hang:
            outcome = "hang"
        except clean:
            outcome = "clean error"
        except BaseException as exc:  # noqa: BLE001 - a crash is anything else, a library panic included
            if isinstance(exc, KeyboardInterrupt):
                raise
            outcome = "crash"
            examples.setdefault(f"{type(exc).__name__}: {str(exc)[:80]}", data[:64].hex())
        finally:
            signal.alarm(0)
        counts[outcome] += 1
        if outcome == "wrong accept":
            examples.setdefault("wrong accept", data[:64].hex())
    return {**counts, "seconds": round(time.perf_counter() - t0, 1), "examples": examples}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000, help="inputs per decoder")
    p.add_argument("--json", default="")
    p.add_argument("--only", default="", help="comma-separated decoders")
    a = p.parse_args()
    names = [t for t in TARGETS if not a.only or t in a.only.split(",")]
    columns = f"{'tried':>7} {'accepted':>9} {'clean error':>12} {'wrong accept':>13} {'crash':>6} {'hang':>5}"
    print(f"{'decoder':<12} {columns}")
    results = {}
    for name in names:
        r = results[name] = campaign(name, a.n)
        print(f"{name:<12} {r['tried']:>7} {r['accepted']:>9} {r['clean error']:>12} {r['wrong accept']:>13} "
              f"{r['crash']:>6} {r['hang']:>5}   ({r['seconds']} s)", flush=True)  # fmt: skip
        for what, example in r["examples"].items():
            print(f"    {what}  [{example}]")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "command": f"benchmarks/fuzz.py --n {a.n}", "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
