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
import math
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
from prismfl.fl import aggregate, quantize, rangecode, wire
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


def quantized_target():
    """The quantized broadcast (fl/quantize.py) a client of a 4-level run decodes."""
    seeds = [quantize.encode(quantize.quantize(STATE, levels, 0.01, torch.Generator().manual_seed(4)), levels,
                             round_=2, table_hash=TABLE) for levels in (4, 4, 2)]  # fmt: skip

    def check(data: bytes) -> str:
        got = quantize.decode(data, num_weights=STATE_N, table_hash=TABLE, count=4, round_=2)
        return "ok" if quantize.encode(got, 4, round_=2, table_hash=TABLE) == data and int(got.max()) < 4 else "wrong"

    return seeds, check, reseal_wire, wire.WireError


def setup_messages_target(which: str):
    """A node's feature statistics (the pooled warm start) or moment sums (the modes) at set-up, as the
    server decodes them (fl/client.py statistics_of_message, moments_of_message): 4 codes, 6 classes."""
    from prismfl.data.modes import moment_sums
    from prismfl.fl import client
    from prismfl.loss.matching import feature_stats

    gen = torch.Generator().manual_seed(5)
    images, labels = torch.rand(12, 1, 4, 4, generator=gen), torch.tensor([0, 2] * 6)
    if which == "statistics":
        stats = feature_stats(lambda x: [x.flatten(1), x.flatten(1)[:, :2] * 3], images, labels=labels, num_classes=4)
        seeds = [client.statistics_message(stats)]

        def check(data: bytes) -> str:
            got = client.statistics_of_message(data, 4)
            fits = all(m.shape == v.shape and m.shape[0] == 4 for m, v in zip(got.mean, got.var))
            return "ok" if fits and all(torch.isfinite(t).all() for t in got.mean + got.var) else "wrong"
    else:
        pixels = (torch.rand(12, 1, 28, 28, generator=gen) * 255).to(torch.uint8).numpy()
        seeds = [client.moments_message(moment_sums(pixels, labels.numpy(), 6, 1 / 255))]

        def check(data: bytes) -> str:
            got = client.moments_of_message(data, 6, 196)  # (safestate's bytes are not canonical: no re-encoding)
            symmetric = bool((got["outer"] == got["outer"].transpose(0, 2, 1)).all())
            return "ok" if got["outer"].shape == (6, 196, 196) and symmetric else "wrong"

    return seeds, check, lambda d: d, (safestate.StateError, ValueError)


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
        cfg.arch_spec().validate()
        return "ok"

    return seeds, check, lambda d: d, ConfigError


# ---------------------------------------------------------------- structure-aware targets
# Valid framing, hostile content: the generator builds a well-formed input, changes one or more of its
# fields to a value drawn from edge cases, and says, by its own rule for each field, whether an honest
# peer could have sent the result. A wrong accept is an input it marks hostile that the receiver takes.


def hostile_value(rng: random.Random):
    """A value of the kinds a Flower ConfigRecord can carry, from edge cases."""
    return rng.choice([
        -1, 0, 1, 2, 4, 5, 2**31, 2**62, -(2**63), True, False, 0.0, -0.0, 1.5, float("nan"), float("inf"), 3e38,
        "", "abc", "0", "null", "{}", "[" * 3000 + "]" * 3000, "{\"a\": " * 50 + "1" + "}" * 50, "x" * 70_000,
        b"", b"k" * 31, b"k" * 33, rng.randbytes(32), [], [1], ["1"] * 10, [0.5] * 10, [2**62] * 10, [-1] * 10,
        [1] * 10, [float("nan")] * 10, [True] * 10, [b"x"], bytes(32),
        '{"steps": 1' + "0" * 400 + "}", '{"feature_net": {}, "privacy": {"epsilon": 1' + "0" * 400 + "}}",
        '{"feature_net": {}, "privacy": {"epsilon": 1.0}}', '{"feature_net": 1, "privacy": null}',
    ])  # fmt: skip


def setup_reply_target(_tmp: Path):
    """A SuperNode's setup reply (flower/replies.py) for a 5-client conditional run of 10 codes."""
    from flwr.app import ConfigRecord, RecordDict

    from prismfl.flower import replies

    n, th, key = 1000, 7, bytes(range(32))
    honest = {"partition-id": 2, "num-weights": n, "table-hash": f"{th:016x}", "class-counts": [3] * 10,
              "source": "fashion-mnist", "model-info": json.dumps({"feature_net": {"kind": "random"}, "privacy": None}),
              "link-key": key, "statistics-class-counts": [3.0] * 10,
              "warm-start-info": json.dumps({"steps": 20, "loss": 0.5})}  # fmt: skip

    def valid(field: str, v) -> bool:  # the fuzzer's own rule for each field (not the receiver's code)
        isnum = lambda x: type(x) in (int, float) and math.isfinite(x)  # noqa: E731
        if field == "partition-id":
            return type(v) is int and 0 <= v < 5
        if field == "num-weights":
            return type(v) is int and v == n
        if field == "table-hash":
            return v == f"{th:016x}"
        if field == "class-counts":  # (a run without privacy: exact counts of every class, or none)
            return isinstance(v, list) and len(v) in (0, 10) and all(type(x) is int and 0 <= x <= 2**40 for x in v)
        if field == "statistics-class-counts":
            return isinstance(v, list) and len(v) == 10 and all(isnum(x) and abs(x) <= 2**40 for x in v)
        if field == "source":
            return isinstance(v, str) and len(v) <= 1000
        if field == "link-key":
            return isinstance(v, bytes) and len(v) == 32
        if field == "model-info":
            try:
                got = json.loads(v) if isinstance(v, str) and len(v) <= 65536 and v.count("[") < 9 else None
            except ValueError:
                return False
            return isinstance(got, dict) and isinstance(got.get("feature_net"), dict) and got.get("privacy") is None
        if field == "warm-start-info":  # any JSON of depth <= 8: the numbers are picked out of it
            try:
                json.loads(v)
            except (ValueError, TypeError, RecursionError):
                return False
            return isinstance(v, str) and len(v) <= 4096 and v.count("[") + v.count("{") <= 8
        return False

    def generate(rng: random.Random):
        reply = dict(honest)
        for _ in range(rng.randrange(1, 3)):
            field = rng.choice(list(honest))
            if rng.random() < 0.15:
                reply.pop(field, None)
            else:
                reply[field] = hostile_value(rng)
        optional = ("statistics-class-counts", "warm-start-info")
        ok = all(f in reply or f in optional for f in honest) and all(valid(f, v) for f, v in reply.items())
        stats, row = reply.get("statistics-class-counts"), reply.get("class-counts")
        agree = stats is None or (ok and row == [round(x) for x in stats])  # exact counts: the row, class by class
        return reply, ok and agree

    def check(reply: dict) -> str:
        try:
            content = RecordDict({"prismfl": ConfigRecord(reply)})
        except (TypeError, ValueError):
            return "unsendable"  # Flower itself refuses to carry it
        replies.setup_reply(content, clients=5, num_weights=n, table_hash=th, num_classes=10, codes=10, secagg=False,
                            key_bytes=32)  # fmt: skip
        return "ok"

    return generate, check, replies.NodeError


def broadcast_target(_tmp: Path):
    """A round's broadcast delta as a client of a 3-clients-a-round MADA run applies it (prism.Rules),
    its framing valid (CRC recomputed); or a full state with hostile values."""
    from prismfl.fl.methods.prism import Rules, apply_broadcast
    from prismfl.seeds import generator_for

    rules = Rules(max_m=3, smoothing=0.01, mada=True, seed=0)
    masks = [aggregate.sample_mask(SCORES, torch.Generator().manual_seed(s)) for s in range(3)]
    counts = aggregate.count_masks(masks)
    lam = aggregate.mada_lambda(SCORES, aggregate.aggregate_scores(counts, 3, 0.01), generator_for(0, "mada", 2))
    # (the fuzzer's honest lambda below is recomputed for the counts it sends; `lam` is the usual choice)

    def generate(rng: random.Random):
        if rng.random() < 0.25:  # a full state
            values = SCORES.clone()
            hostile = rng.random() < 0.7
            if hostile:
                values[rng.randrange(N)] = rng.choice([3e38, -3e38, 1e4 * 1.01, float("nan"), float("inf")])
            payload = values.numpy().astype("<f4").tobytes()
            return ("state", wire.Message(wire.KIND_STATE, wire.CODER_FLOAT32, 1, wire.SERVER, TABLE, N,
                                          payload).to_bytes()), not hostile  # fmt: skip
        m = rng.choice([3, 3, 2, 1, 0, 4, 65535, rng.randrange(65536)])
        lam_ = rng.choice([lam, lam, 0.0, 1.0, -0.0, 0.5, float("nan"), rng.random()])
        smoothing = rng.choice([0.01, 0.01, 0.0, -0.0, 0.4999, 0.02, 0.5, float("nan")])
        other = torch.Generator().manual_seed(rng.randrange(99))
        c = counts.clone() if m == 3 else torch.randint(0, max(m, 1) + 1, (N,), dtype=torch.int32, generator=other)
        payload = wire._DELTA_PREFIX.pack(m, lam_, smoothing)
        try:
            payload += rangecode.encode_binomial(c.numpy(), max(m, 1), rangecode.probabilities(SCORES))
        except Exception:  # noqa: BLE001 - counts the coder cannot take: send them as raw words
            payload += rng.randbytes(64)
        data = wire.Message(wire.KIND_DELTA, wire.CODER_BINOMIAL, 2, wire.SERVER, TABLE, N, payload).to_bytes()
        same = lambda a, b: struct.pack("<d", a) == struct.pack("<d", b)  # noqa: E731
        if not (1 <= m <= 3 and same(smoothing, 0.01)):
            return ("delta", data), False
        # the lambda an honest server sends with these counts (MADA's definition, METHOD.md)
        honest = aggregate.mada_lambda(SCORES, aggregate.aggregate_scores(c, m, 0.01), generator_for(0, "mada", 2))
        return ("delta", data), same(lam_, honest)

    def check(item) -> str:
        kind, data = item
        if kind == "state":
            wire.decode_state(data, num_weights=N, table_hash=TABLE)
            return "ok"
        apply_broadcast(SCORES, data, round_=2, table_hash=TABLE, rules=rules)
        return "ok"

    return generate, check, wire.WireError


def config_values_target(_tmp: Path):
    """Every numeric key of a valid config (the demo's) set to an edge value, one or two at a time. The
    fuzzer's rule: no numeric key of prismfl takes a negative, non-finite, non-number or astronomically
    large value (privacy.epsilon = inf excepted: no privacy, the demo's own value)."""
    from prismfl.config import config_from_dict

    root = Path(__file__).resolve().parents[1] / "configs"
    base = load_config(root / "fmnist-noniid.toml").to_dict()
    keys = [(section, key) for section, table in base.items() if isinstance(table, dict)
            for key, v in table.items() if type(v) in (int, float)]  # fmt: skip
    keys.append((None, "seed"))
    hostile = [float("nan"), float("inf"), -float("inf"), -1, -1e-300, -1e300, 1e300, 10**40, 2**64, True, "1", [1]]

    def generate(rng: random.Random):
        table = json.loads(json.dumps(base))
        honest = True
        for _ in range(rng.randrange(1, 3)):
            section, key = rng.choice(keys)
            value = rng.choice(hostile)
            (table if section is None else table[section])[key] = value
            honest = honest and (section, key) == ("privacy", "epsilon") and value == float("inf")  # the demo's own
        return table, honest

    def check(table: dict) -> str:
        config_from_dict(table)
        return "ok"

    return generate, check, ConfigError


def restored_state_target(tmp: Path):
    """What `train --resume` restores: a small simulator run's checkpoint (tests/test_resume_fields.py's),
    one to three of its JSON fields edited at once in that test's hostile ways (deleted, wrong type, -1,
    10**9, 2**70, 1.5, a string, a list shortened or with an item duplicated), through the engine's own
    restore path. An edit that test does not list as harmless must be refused (the harmless ones, history,
    defaults and descriptions, may be taken or refused); a refusal must be one line."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from safetensors.torch import load

    import test_resume_fields as rf
    from prismfl.errors import PrismError
    from prismfl.fl import simulate
    from prismfl.fl.client import client_context
    from prismfl.fl.methods import registry

    cfg = load_config(rf.SMOKE, rf.SETS)
    simulate.train(cfg, tmp / "run", log=lambda *_: None)
    data = (tmp / "run" / rundir.CHECKPOINT).read_bytes()
    tree = json.loads(safestate.read_header(data, "checkpoint")["__metadata__"][safestate.META_KEY])
    method = registry.build(cfg)
    ctx = client_context(cfg, method.build_model, "cpu", log=lambda *_: None)
    restore = rf.Restore(tmp / "run", cfg, tree, load(data), method, simulate.expect_of(method, ctx, 1))
    edits = [(path, name, new) for path, value in rf.fields(tree) for name, new in rf.hostile(value)]
    rundir.checkpoint_config = rf.memo_config(rundir.checkpoint_config)  # (this process only runs the campaign)

    def harmless(path, name) -> bool:
        import re

        return any(re.fullmatch(p, rf.dotted(path)) and re.fullmatch(x, name) for p, x in rf.HARMLESS)

    def generate(rng: random.Random):
        edited, honest = tree, True
        for _ in range(rng.randrange(1, 4)):
            path, name, new = rng.choice(edits)
            try:
                edited = rf.edited(edited, path, new)
            except (KeyError, IndexError, TypeError):  # an earlier edit removed or retyped its parent
                continue
            honest = honest and harmless(path, name)
        # (through JSON text, as a checkpoint's tree always is: an edit that put an int key in a table
        # becomes a string key)
        return json.loads(json.dumps(edited)), None if honest else False  # harmless edits may be taken or refused

    def check(edited: dict) -> str:
        try:
            restore(edited)
        except PrismError as exc:
            if "\n" in str(exc) or not str(exc):
                raise RuntimeError(f"a refusal of more than one line: {exc!r}") from None
            raise
        return "ok"

    return generate, check, PrismError


# each target gets a scratch directory for the files its decoder reads, removed after its campaign
TARGETS = {"upload": lambda _: wire_target("upload"), "delta": lambda _: wire_target("delta"),
           "state": lambda _: wire_target("state"), "quantized": lambda _: quantized_target(),
           "statistics": lambda _: setup_messages_target("statistics"),
           "moments": lambda _: setup_messages_target("moments"),
           "model file": lambda _: model_target(),
           "checkpoint": checkpoint_target, "config": config_target}  # fmt: skip
STRUCTURED = {"setup reply": setup_reply_target, "broadcast": broadcast_target, "config values": config_values_target,
              "restored state": restored_state_target}  # fmt: skip


def campaign(name: str, n: int, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory(prefix="prismfl-fuzz-") as tmp:
        if name in STRUCTURED:
            return _campaign(STRUCTURED[name](Path(tmp)), name, n, seed)
        seeds, check, reseal, clean = TARGETS[name](Path(tmp))

        def generate(rng: random.Random):
            return mutate(rng.choice(seeds), rng, reseal), None  # None: "wrong" is the check's to say

        return _campaign((generate, check, clean), name, n, seed)


def _campaign(target, name: str, n: int, seed: int) -> dict:
    """Run `n` inputs of `generate(rng) -> (input, honest)` through `check(input) -> "ok" | "wrong"`;
    an input the generator marks not honest (honest False) that is accepted is a wrong accept."""
    generate, check, clean = target
    rng = random.Random(f"{seed}:{name}")
    counts = {"tried": 0, "accepted": 0, "clean error": 0, "wrong accept": 0, "crash": 0, "hang": 0}
    examples: dict[str, str] = {}

    def on_alarm(*_):
        raise Hang

    signal.signal(signal.SIGALRM, on_alarm)
    t0 = time.perf_counter()
    for _ in range(n):
        data, honest = generate(rng)
        signal.alarm(5)
        try:
            verdict = check(data)
            if verdict == "unsendable":  # the transport cannot carry it: not a case
                continue
            outcome = "wrong accept" if verdict == "wrong" or honest is False else "accepted"
        except Hang:
            outcome = "hang"
        except clean:
            outcome = "clean error"
        except BaseException as exc:  # noqa: BLE001 - a crash is anything else, a library panic included
            if isinstance(exc, KeyboardInterrupt):
                raise
            outcome = "crash"
            examples.setdefault(f"{type(exc).__name__}: {str(exc)[:80]}", show(data))
        finally:
            signal.alarm(0)
        counts["tried"] += 1
        counts[outcome] += 1
        if honest is True and outcome == "clean error":  # structured targets: an honest input refused
            counts["honest refused"] = counts.get("honest refused", 0) + 1
            examples.setdefault("honest refused", show(data))
        if outcome == "wrong accept":
            examples.setdefault("wrong accept", show(data))
    return {**counts, "seconds": round(time.perf_counter() - t0, 1), "examples": examples}


def show(data) -> str:
    return data[:64].hex() if isinstance(data, bytes) else repr(data)[:200]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000, help="inputs per decoder")
    p.add_argument("--json", default="")
    p.add_argument("--only", default="", help="comma-separated decoders")
    a = p.parse_args()
    names = [t for t in (*TARGETS, *STRUCTURED) if not a.only or t in a.only.split(",")]
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
