import os
from pathlib import Path

import pytest

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
