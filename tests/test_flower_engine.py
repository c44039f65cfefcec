"""Flower for real (slow; `make test-flower`): the simulation engine, and a deployment of a SuperLink
and SuperNodes as separate processes on loopback ports, insecure and with TLS, with faults.

Every process these tests start is ended by tests/loopback.py, which finds it (and everything
it started) by a tag in its environment, even when a test fails.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional extra prismfl[flower]")

from conftest import full_state_bytes, needs_fmnist
from loopback import TAG, Loopback, kill_tagged, tagged_pids
from prismfl import modelfile, rundir
from prismfl.capabilities import METHODS
from prismfl.config import load_config
from prismfl.fl import engine, simulate, wire
from test_flower_apps import SMOKE, strip

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, needs_fmnist]
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
             "FLWR_TELEMETRY_ENABLED": "0"}  # fmt: skip

SIMULATION = """
import os
import signal
import sys
from pathlib import Path
import torch
from flwr.simulation import run_simulation
from prismfl.flower.client_app import app as client_app
from prismfl.flower.server_app import make_server_app

config, out, overrides, resume, kill_after = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", \
    int(sys.argv[5])


def on_round(rnd, state):
    key = "scores" if "scores" in state else "weights"
    torch.save(state[key].clone(), out / f"state-{rnd}.pt")
    if rnd == kill_after:  # kill -9 right after the round's checkpoint
        os.kill(os.getpid(), signal.SIGKILL)


server = make_server_app({"config-file": config, "out-dir": str(out / "run"), "reply-timeout": 300.0,
                          "overrides": overrides, "resume": resume}, on_round=on_round)
run_simulation(server, client_app, num_supernodes=3, backend_config={
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "num_gpus": 0}})
"""


def one_thread_simulator(out: Path, overrides: list[str]) -> list[torch.Tensor]:
    """The simulator with one thread, as the Flower processes compute (OMP_NUM_THREADS=1): float sums
    are ordered differently with more threads, so the scores would differ in their last bits."""
    per_round, threads = [], torch.get_num_threads()
    key = "weights" if any("fedavg" in o for o in overrides) else "scores"
    cfg = load_config(SMOKE, overrides)
    torch.set_num_threads(1)
    try:
        engine.run(cfg, out, simulate.InProcess(cfg), log=lambda *_: None,
                   on_round=lambda rnd, state: per_round.append(state[key].clone()))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return per_round


def simulation_engine(tmp_path: Path, overrides: str = "", resume: bool = False, kill_after: int = 0):
    tag = uuid.uuid4().hex
    env = {**os.environ, **CHILD_ENV, TAG: tag}
    try:
        return subprocess.run([sys.executable, "-c", SIMULATION, str(SMOKE), str(tmp_path), overrides,
                               "1" if resume else "0", str(kill_after)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    finally:
        kill_tagged(tag)  # Ray's workers, should any outlive the script


@pytest.fixture(scope="module")
def two_round_simulator(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim2") / "run"
    one_thread_simulator(out, ["train.rounds=2"])
    return out


@pytest.mark.parametrize("method", ["prism", "fedavg"])
def test_simulation_engine_matches_the_simulator_bit_for_bit(method, tmp_path_factory):
    """Flower's simulation engine (Ray, one ClientApp actor per core) against the simulator."""
    overrides = f'train.method="{method}"' + (" train.rounds=2" if method == "fedavg" else "")
    sim_out = tmp_path_factory.mktemp("sim") / "run"
    sim_states = one_thread_simulator(sim_out, overrides.split())
    tmp_path = tmp_path_factory.mktemp("engine")
    done = simulation_engine(tmp_path, overrides)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "run"
    for rnd, expected in enumerate(sim_states, start=1):
        assert torch.equal(torch.load(tmp_path / f"state-{rnd}.pt"), expected), f"round {rnd}"
    assert strip(rundir.read_metrics(out)) == strip(rundir.read_metrics(sim_out))
    model = METHODS[method].model
    for name in [model, "partition.txt", "config.toml"]:
        assert (out / name).read_bytes() == (sim_out / name).read_bytes(), name


def test_simulation_engine_run_killed_and_resumed(tmp_path):
    """kill -9 of the whole simulation after round 2; run config resume=true finishes the run."""
    killed = simulation_engine(tmp_path, kill_after=2)
    assert killed.returncode == -9, killed.stderr[-3000:]
    out = tmp_path / "run"
    assert rundir.load_checkpoint(out)["round"] == 2
    done = simulation_engine(tmp_path, resume=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = rundir.read_metrics(out)
    assert [r["round"] for r in records] == [1, 2, 3] and (out / "model.prism").is_file()
    n = modelfile.load(out / "model.prism").mask.numel()
    state = full_state_bytes(out, 2)  # the restarted clients get the full state, range-coded
    assert records[2]["download_bytes"] == 3 * state and state < wire.HEADER.size + 4 * n
    assert torch.equal(torch.load(tmp_path / "state-3.pt"), rundir.load_checkpoint(out)["server"]["scores"])


def assert_all_stopped(lb: Loopback) -> None:
    left = [p for p in tagged_pids(lb.tag) if Path(f"/proc/{p}").exists()]
    assert not left, f"processes left running: {left}"


def test_deployment_on_loopback_matches_the_simulator(two_round_simulator, tmp_path):
    """A SuperLink and 3 SuperNodes (separate processes, insecure), 2 rounds with `flwr run`."""
    out = tmp_path / "run"
    lb = Loopback(tmp_path / "lb", 3)
    try:
        lb.start()
        result = lb.run(ROOT, {"out-dir": str(out), "overrides": "train.rounds=2", "reply-timeout": 300.0},
                        timeout=400)  # fmt: skip
        assert result.status == "finished:completed", result.log[-3000:] + lb.log("superlink")[-3000:]
    finally:
        lb.stop()
    assert_all_stopped(lb)

    sim = two_round_simulator
    assert (out / "model.prism").read_bytes() == (sim / "model.prism").read_bytes()
    model = modelfile.load(out / "model.prism")
    assert model.info["rounds"] == 2 and model.info["clients"] == 3
    records = rundir.read_metrics(out)
    assert strip(records) == strip(rundir.read_metrics(sim))  # every byte count, loss and lambda
    n = model.mask.numel()
    assert [r["clients"] for r in records] == [[0, 1, 2], [0, 1, 2]]
    assert all(0 < r["upload_bytes"] <= 3 * (wire.HEADER.size + (n + 7) // 8) for r in records)
    assert records[0]["download_bytes"] == 0  # round 0 comes from the seed
    assert records[1]["download_bytes"] == 3 * records[0]["broadcast_bytes"]  # each client got the delta


FAULTY_APP = """
import os
import time
from pathlib import Path

from prismfl.flower.client_app import make_client_app
from prismfl.flower.payload import from_array, to_array

MARKS = Path(os.environ["PRISMFL_FAULT_MARKS"])


def faults(message, context, call_next):
    k = context.node_config["partition-id"]
    rnd = int(message.content["prismfl"]["round"]) if message.metadata.message_type == "train" else 0
    if (rnd, k) == (2, 2):  # this client's machine dies in round 2: the test kills it while it waits here
        (MARKS / "client2-round2").touch()
        time.sleep(600)
    reply = call_next(message, context)
    if (rnd, k) == (1, 1):  # a broken link: client 1's upload of round 1 no longer decodes
        data = bytearray(from_array(reply.content["upload"]["000"]))
        data[-1] ^= 0xFF
        reply.content["upload"]["000"] = to_array(bytes(data))
    return reply


app = make_client_app(mods=[faults])
"""


def faulty_app_dir(path: Path) -> Path:
    """A Flower app whose ClientApp is prismfl's, wrapped in a mod that injects the faults."""
    (path / "configs").mkdir(parents=True)
    (path / "configs" / "smoke.toml").write_bytes(SMOKE.read_bytes())
    (path / "prismfl_faults.py").write_text(FAULTY_APP)
    (path / "pyproject.toml").write_text(
        textwrap.dedent("""
        [project]
        name = "prismfl-faults"
        version = "0.1.0"
        description = "prismfl's Flower apps with injected faults (tests only)"
        license = "Apache-2.0"

        [tool.flwr.app]
        publisher = "prismfl"
        fab-include = ["*.py", "configs/*.toml"]

        [tool.flwr.app.components]
        serverapp = "prismfl.flower.server_app:app"
        clientapp = "prismfl_faults:app"

        [tool.flwr.app.config]
        config-file = "configs/smoke.toml"
        overrides = ""
        out-dir = "runs/flower"
        min-replies = 1
        reply-timeout = 600.0
        connect-timeout = 120.0
    """)
    )
    return path


def test_a_killed_supernode_and_a_bad_upload_leave_the_rounds_to_the_others(tmp_path):
    out, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    app = faulty_app_dir(tmp_path / "app")
    lb = Loopback(tmp_path / "lb", 3)
    lb.env["PRISMFL_FAULT_MARKS"] = str(marks)
    results, started = [], time.monotonic()
    try:
        lb.start()
        run_config = {"out-dir": str(out), "overrides": "train.rounds=2", "reply-timeout": 30.0, "min-replies": 2}
        runner = threading.Thread(target=lambda: results.append(lb.run(app, run_config, timeout=400)), daemon=True)
        runner.start()
        deadline = time.monotonic() + 300
        while not (marks / "client2-round2").exists() and time.monotonic() < deadline and runner.is_alive():
            time.sleep(0.2)
        assert (marks / "client2-round2").exists(), lb.log("supernode-2")[-3000:]
        lb.kill_node(2)  # mid-round: the server has sent round 2 and waits for the replies
        killed_at = time.monotonic()
        runner.join(timeout=300)
        assert results, "flwr run did not return"
        assert results[0].status == "finished:completed", results[0].log[-3000:]
        assert time.monotonic() - killed_at < 30 + 60  # the round ended at the reply timeout at the latest
    finally:
        lb.stop()
    assert_all_stopped(lb)
    assert time.monotonic() - started < 600

    records = rundir.read_metrics(out)
    assert [r["clients"] for r in records] == [[0, 2], [0, 1]]
    (bad,) = records[0]["failures"]
    assert bad["client"] == 1 and "ChecksumMismatch" in bad["error"]
    (dead,) = records[1]["failures"]
    assert dead["client"] == 2 and "no reply within 30 s" in dead["error"]
    assert modelfile.load(out / "model.prism").info["rounds"] == 2
    # round 2: client 0 gets the delta; client 1, whose upload failed, the full state; client 2 the delta
    assert records[1]["download_bytes"] == 2 * records[0]["broadcast_bytes"] + full_state_bytes(out, 1)


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost, signed by it."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject, issuer, key, signer, extensions):
        b = x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        b = b.serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        b = b.not_valid_after(now + datetime.timedelta(days=1))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build(name("prismfl test CA"), name("prismfl test CA"), ca_key, ca_key,
               [(x509.BasicConstraints(ca=True, path_length=None), True),
                (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                               key_encipherment=False, data_encipherment=False, key_agreement=False,
                               encipher_only=False, decipher_only=False), True)])  # fmt: skip
    server = build(name("127.0.0.1"), ca.subject, server_key, ca_key,
                   [(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                  x509.DNSName("localhost")]), False),
                    (x509.BasicConstraints(ca=False, path_length=None), True),
                    (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))  # fmt: skip
    return paths


def test_deployment_with_tls(tmp_path):
    import httpx

    out = tmp_path / "run"
    certs = make_certificates(tmp_path / "certs")
    lb = Loopback(tmp_path / "lb", 2, certificates=certs)
    try:
        lb.start()
        with pytest.raises(httpx.HTTPError):  # plain HTTP is refused: the SuperLink speaks TLS only
            httpx.get(f"http://127.0.0.1:{lb.port}/health", timeout=2)
        with pytest.raises(httpx.HTTPError):  # and a client that does not trust the test CA gets nothing
            httpx.get(f"https://127.0.0.1:{lb.port}/health", timeout=2)
        overrides = "partition.num_clients=2 train.rounds=1"
        result = lb.run(ROOT, {"out-dir": str(out), "overrides": overrides, "reply-timeout": 300.0}, timeout=400)
        assert result.status == "finished:completed", result.log[-3000:] + lb.log("superlink")[-3000:]
    finally:
        lb.stop()
    assert_all_stopped(lb)
    (record,) = rundir.read_metrics(out)
    assert record["clients"] == [0, 1] and "failures" not in record
    assert modelfile.load(out / "model.prism").info["clients"] == 2
