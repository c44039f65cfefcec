"""The commands the README and docs/getting-started.md show run as shown (docs/getting-started.md, "How this
page is tested", states the rules):

- every command in their code blocks and every `prismfl ...` quoted in their prose is parsed by the CLI's
  own parser, and the config it names loads with its --set values; `make` targets exist in the Makefile;
  a benchmark script exists and takes the options given;
- then the `prismfl` commands of getting-started's code blocks run, in order, in a scratch directory, each
  with the smoke-size options of SMOKE appended (the README's code blocks show the same commands);
- the Python blocks of docs/python-api.md and docs/custom-data.md run.

The other pages' `prismfl` commands (results, configs, privacy, custom data, evaluation) are parsed and
their configs loaded, so that no page shows a command the CLI or the config checks refuse.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from conftest import needs_fmnist
from prismfl.cliref import commands
from prismfl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RUN = ["README.md", "docs/getting-started.md"]  # every command they show, blocks and prose
PARSE = ["docs/results.md", "docs/configs.md", "docs/privacy.md", "docs/custom-data.md", "docs/evaluation.md"]
SHELL = ("python", "python3", ".venv/bin/python")
NOT_RUN = ("pip", "source", "export", "sudo", "apt-get", "cd", "git")  # set-up lines: shown, not run by a test

# Appended to a command of that kind before it runs (docs/getting-started.md says the same).
SMOKE_TRAIN = ["data.subset=2000", "model.width=32", "loss.feature_width=4", "train.local_steps=2", "train.rounds=2"]
SMOKE_EVALUATE = ["--n", "200", "--synthetic", "0"]


FENCE = r"^```(\w*)\n(.*?)^```"
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")


def fenced(path: str, languages: tuple[str, ...]) -> list[str]:
    """The code blocks of a Markdown file whose language is one of `languages` ("" for none)."""
    text = (ROOT / path).read_text()
    return [body for lang, body in re.findall(FENCE, text, flags=re.S | re.M) if lang in languages]


def argvs(body: str) -> list[list[str]]:
    """The command lines of a shell block, continuations joined, comments and VAR=value prefixes dropped."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def block_commands(path: str) -> list[list[str]]:
    """Every command line of a file's shell blocks."""
    return [argv for body in fenced(path, SHELL_BLOCKS) for argv in argvs(body)]


def shown(path: str) -> list[list[str]]:
    """A file's commands in the order a reader meets them: the lines of its shell blocks, and every
    `prismfl ...` (with an argument: `prismfl train` alone names a command), `python benchmarks/...` or
    `make ...` quoted in its prose."""
    text = (ROOT / path).read_text()
    out = []
    for m in re.finditer(FENCE + r"|`([^`]+)`", text, flags=re.S | re.M):
        lang, body, span = m.groups()
        if body is not None:
            out += argvs(body) if lang in SHELL_BLOCKS else []
        elif " ".join(span.split()).startswith(("prismfl ", "python benchmarks/", "make ")):
            argv = shlex.split(" ".join(span.split()))
            out += [argv] if len(argv) >= 3 or argv[0] == "make" else []  # `prismfl train` names a command
    return out


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def check(argv: list[str]) -> None:
    """Parse one documented command as its program would; load the config a prismfl command names."""
    program = argv[0]
    if program == "prismfl":
        cmds = commands()
        assert len(argv) > 1 and argv[1] in cmds, f"no such command: {shlex.join(argv)}"
        try:
            ctx = cmds[argv[1]].make_context(f"prismfl {argv[1]}", list(argv[2:]))
        except click.ClickException as exc:
            pytest.fail(f"{shlex.join(argv)}: {exc.format_message()}")
        params = ctx.params
        config = params.get("config") or (params.get("source") if str(params.get("source", "")).endswith(".toml")
                                          else None)  # fmt: skip
        if config is not None:
            overrides = list(params.get("set_") or [])
            if params.get("method"):
                overrides.append(f'train.method="{params["method"]}"')
            assert (ROOT / config).is_file(), f"{shlex.join(argv)}: {config} does not exist"
            load_config(ROOT / config, overrides)  # a ConfigError names the mistake
    elif program == "make":
        assert set(argv[1:]) <= make_targets(), f"{shlex.join(argv)}: no such target in the Makefile"
    elif program in SHELL and len(argv) > 1 and argv[1].startswith("benchmarks/"):
        source = (ROOT / argv[1]).read_text()
        for option in (a for a in argv[2:] if a.startswith("--")):
            assert f'"{option}"' in source, f"{shlex.join(argv)}: the script takes no {option}"
    elif program in SHELL and argv[1:3] == ["-m", "venv"]:
        pass
    else:
        assert program in NOT_RUN, f"a documented command the test does not know how to check: {shlex.join(argv)}"


ALL = [(page, argv) for page in RUN + PARSE for argv in (shown(page) if page in RUN else block_commands(page))]


def test_the_pages_show_commands():
    assert len(shown("README.md")) >= 8 and len(shown("docs/getting-started.md")) >= 10
    assert len([a for a in shown("README.md") if a[0] == "prismfl"]) >= 5


@pytest.mark.parametrize(("page", "argv"), ALL, ids=[f"{p}: {shlex.join(a)[:80]}" for p, a in ALL])
def test_every_documented_command_parses_and_its_config_loads(page, argv):
    check(argv)


def smoke(argv: list[str]) -> list[str]:
    """The command as the test runs it: SMOKE's options appended (a later --set or option wins)."""
    argv = list(argv)
    if argv[:2] == ["prismfl", "train"]:
        params = commands()["train"].make_context("prismfl train", argv[2:]).params
        method = [f'train.method="{params["method"]}"'] if params["method"] else []
        sets = SMOKE_TRAIN + (
            ["train.warm_start=4"] if load_config(params["config"], [*params["set_"], *method]).train.warm_start else []
        )
        argv += [x for s in sets for x in ("--set", s)]
    elif argv[:2] == ["prismfl", "evaluate"]:
        argv += SMOKE_EVALUATE
    return argv


def runnable() -> list[list[str]]:
    """The commands that run: the `prismfl` lines of getting-started's code blocks, in order."""
    return [argv for argv in block_commands("docs/getting-started.md") if argv[0] == "prismfl"]


def test_the_readmes_commands_are_among_those_that_run():
    """The README's code blocks show getting-started's commands (its prose quotes more: those are parsed)."""
    for argv in block_commands("README.md"):
        assert argv[0] == "make" or argv in runnable(), f"{shlex.join(argv)} is not run by this test"


@needs_fmnist
def test_the_commands_run_at_smoke_size(tmp_path, monkeypatch, run_cli):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for argv in runnable():
        line = shlex.join(smoke(argv))
        code, out, err = run_cli(*smoke(argv)[1:])
        assert code == 0, f"{line}\n{out[-2000:]}\n{err[-2000:]}"
    assert (tmp_path / "runs" / "fm" / "model.prism").is_file() and (tmp_path / "fm.json").is_file()
    assert (tmp_path / "sandals.npz").is_file() and (tmp_path / "runs" / "fm-auto" / "model.prism").is_file()


@needs_fmnist
def test_the_python_api_example_runs(tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    (block,) = fenced("docs/python-api.md", ("python",))
    exec(compile(block, "docs/python-api.md", "exec"), {"__name__": "__doc__"})
    assert (tmp_path / "runs" / "api" / "rows.png").is_file()


def test_the_custom_data_example_writes_files_prismfl_reads(tmp_path, monkeypatch):
    import numpy as np

    from prismfl.data.sources import load_split

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (60, 28, 28), dtype=np.uint8),
              "train_labels": (np.arange(60) % 10).astype(np.uint8),
              "test_images": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
              "test_labels": (np.arange(20) % 10).astype(np.uint8)}  # fmt: skip
    (block,) = fenced("docs/custom-data.md", ("python",))
    exec(compile(block, "docs/custom-data.md", "exec"), dict(arrays))
    train, test = load_split("mnist", "train", "mydata"), load_split("mnist", "test", "mydata")
    assert (train.images[:, 0] == arrays["train_images"]).all() and (test.labels == arrays["test_labels"]).all()
