import os
from pathlib import Path

import pytest
import torch

from prismfl.data.sources import find_idx

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Networks prismfl trains for itself go to a per-session cache, not the user's."""
    os.environ["PRISMFL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


def have_fmnist() -> bool:
    root = os.environ.get("PRISMFL_DATA_ROOT")
    return find_idx(Path(root) if root else FMNIST, "train-images-idx3-ubyte") is not None


needs_fmnist = pytest.mark.skipif(
    not have_fmnist() and not os.environ.get("CI"),
    reason="FashionMNIST not installed (make test installs it; CI always has it)",
)


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `prismfl ARGS...` in-process; return (exit code, stdout, stderr)."""
    import sys

    from prismfl.cli import main

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["prismfl", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def full_state_bytes(run_dir: Path, round_: int) -> int:
    """The bytes of the full state of `round_` as PRISM's server sends it (range-coded, wire coder 5),
    rebuilt from round 0's scores (the seed's; no warm start) and the deltas the checkpoint keeps:
    what a client whose replica is unknown downloads in round `round_` + 1."""
    from prismfl import rundir
    from prismfl.fl import wire
    from prismfl.fl.methods.prism import catch_up
    from prismfl.model.build import initial_scores

    state = rundir.load_checkpoint(run_dir)
    cfg, server = rundir.checkpoint_config(state), state["server"]
    n, beta = server["num_weights"], cfg.train.server_momentum
    assert not cfg.train.warm_start and all(r in server["deltas"] for r in range(1, round_ + 1))
    scores = initial_scores(cfg, n)
    replica = torch.cat([scores, torch.zeros(n)]) if beta else scores
    deltas = [server["deltas"][r].numpy().tobytes() for r in range(1, round_ + 1)]
    held, replica = catch_up(replica, 0, deltas, num_weights=n, table_hash=server["table_hash"], beta=beta)
    parts = [replica[:n], replica[n:]] if beta else [replica]
    return sum(len(wire.encode_state(p, round_=held, table_hash=server["table_hash"], coder="auto")) for p in parts)
