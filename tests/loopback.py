"""A whole Flower deployment on one machine: a SuperLink and N SuperNodes on 127.0.0.1, as child
processes, with `flwr run` against them. For the integration tests (tests/test_flower_engine.py) and
the timing benchmark (benchmarks/flower_round_time.py, which imports it from here); on several
machines run the same commands by hand (docs/deploy.md). Not part of the installed package.

Every process it starts, and everything those start (Flower's SuperExec, ServerApp and ClientApp
processes, some in sessions of their own), carries a tag in its environment; `stop()` finds them
all by that tag in /proc and ends them, so nothing outlives the `with` block, even after a failure.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

TAG = "PRISMFL_LOOPBACK_TAG"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tagged_pids(tag: str) -> list[int]:
    """Processes of this user whose environment holds TAG=<tag...> (those we started and their children)."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if any(item.startswith(needle) for item in env.split(b"\0")):
            found.append(int(entry.name))
    return found


def kill_tagged(tag: str, grace: float = 3.0) -> None:
    """SIGTERM every tagged process, then SIGKILL what is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        pids = tagged_pids(tag)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [p for p in tagged_pids(tag) if not _zombie(p)]
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


@dataclass
class RunResult:
    run_id: str
    status: str  # Flower's, e.g. "finished:completed" or "finished:failed"
    log: str  # what `flwr run --stream` printed: the ServerApp's log


class Loopback:
    """A SuperLink and `num_nodes` SuperNodes on loopback ports; node i has partition-id i.

    `certificates` = (ca, server certificate, server key) paths turns TLS on everywhere. With
    `simulation=True` the SuperLink runs Flower's simulation engine instead (no SuperNodes: say how
    many virtual ones with `run(..., federation_config={"num-supernodes": 10})`).
    """

    def __init__(self, workdir: Path, num_nodes: int, *, num_partitions: int | None = None,
                 certificates: tuple[Path, Path, Path] | None = None, node_config: dict | None = None,
                 threads: int = 1, simulation: bool = False):  # fmt: skip
        self.workdir = Path(workdir)
        self.simulation = simulation
        self.num_nodes, self.num_partitions = num_nodes, num_partitions or num_nodes
        self.certificates = certificates
        self.node_config = node_config or {}
        self.tag = uuid.uuid4().hex
        self.port = free_port()
        self.node_ports = [free_port() for _ in range(num_nodes)]  # each SuperNode's own runtime API
        self.home = self.workdir / "flwr-home"
        self.procs: dict[str, subprocess.Popen] = {}
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),  # Flower starts flower-superexec by name
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            TAG: self.tag,
        }
        self.bin = bindir

    # ------------------------------------------------------------ processes

    def _start(self, name: str, args: list[str], tag_suffix: str = "") -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed by the process' end)
        env = {**self.env, TAG: self.tag + tag_suffix}
        proc = subprocess.Popen([str(Path(self.bin) / args[0]), *args[1:]], cwd=self.workdir, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        log.close()
        self.procs[name] = proc
        return proc

    def _tls_link(self) -> list[str]:
        if self.certificates is None:
            return ["--insecure"]
        ca, cert, key = self.certificates
        return ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]

    def _tls_node(self) -> list[str]:
        return ["--insecure"] if self.certificates is None else ["--root-certificates", str(self.certificates[0])]

    def superlink_command(self) -> list[str]:
        mode = ["--simulation"] if self.simulation else []
        return ["flower-superlink", *self._tls_link(), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation", *mode]  # fmt: skip

    def supernode_command(self, i: int) -> list[str]:
        config = {"partition-id": i, "num-partitions": self.num_partitions, **self.node_config}
        items = " ".join(f"{k}={_toml(v)}" for k, v in config.items())
        return ["flower-supernode", *self._tls_node(), "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(self.node_ports[i]), "--node-config", items]  # fmt: skip

    def start(self, timeout: float = 60.0) -> Loopback:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self._write_connection()
        self._start("superlink", self.superlink_command())
        self._wait_for_superlink(timeout)
        for i in range(self.num_nodes):
            self._start(f"supernode-{i}", self.supernode_command(i), tag_suffix=f"-node{i}")
        return self

    def _write_connection(self) -> None:
        lines = ["[superlink]", 'default = "loopback"', "", "[superlink.loopback]",
                 f'address = "127.0.0.1:{self.port}"']  # fmt: skip
        if self.certificates is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.certificates[0]}"')
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def _wait_for_superlink(self, timeout: float) -> None:
        import ssl

        import httpx

        scheme = "http" if self.certificates is None else "https"
        verify = True if self.certificates is None else ssl.create_default_context(cafile=str(self.certificates[0]))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {self.log('superlink')[-2000:]}")
            try:
                if httpx.get(f"{scheme}://127.0.0.1:{self.port}/health", verify=verify, timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"flower-superlink not ready after {timeout:g} s: {self.log('superlink')[-2000:]}")

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode i and everything it started, as a machine that dies would."""
        kill_tagged(f"{self.tag}-node{i}", grace=0)

    def stop(self) -> None:
        kill_tagged(self.tag)
        for proc in self.procs.values():  # and each started process group, should anything have dropped the tag
            if proc.poll() is None:  # still ours (not reaped), so its group id is too
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> Loopback:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------ runs

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(self.bin) / "flwr"), *args], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def run(
        self, app: Path, run_config: dict, timeout: float = 300.0, federation_config: dict | None = None
    ) -> RunResult:
        """`flwr run app loopback --stream` with `run_config`; returns when the run ends (or raises after `timeout`)."""
        items = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        args = ["run", str(app), "loopback", "--stream"] + (["--run-config", items] if items else [])
        if federation_config:
            args += ["--federation-config", " ".join(f"{k}={_toml(v)}" for k, v in federation_config.items())]
        try:
            done = self.flwr(*args, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"flwr run did not end within {timeout:g} s; output:\n{exc.output}") from None
        output = done.stdout + done.stderr
        match = re.search(r"Successfully started run (\d+)", output)
        if match is None:
            raise RuntimeError(f"flwr run failed (exit {done.returncode}):\n{output}")
        run_id = match.group(1)
        return RunResult(run_id, self.status(run_id), output)

    def status(self, run_id: str) -> str:
        import json

        done = self.flwr("list", "--run-id", run_id, "--format", "json")
        try:
            runs = json.loads(done.stdout)["runs"]
            return next(r["status"] for r in runs if str(r["run-id"]) == str(run_id))
        except (ValueError, KeyError, StopIteration):
            return f"unknown ({done.stdout.strip()[-500:]} {done.stderr.strip()[-500:]})"

    def commands(self) -> str:
        """The shell commands this deployment runs (for docs and error messages)."""
        cmds = [self.superlink_command()] + [self.supernode_command(i) for i in range(self.num_nodes)]
        return "\n".join(shlex.join(c) for c in cmds)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
