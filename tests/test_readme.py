"""The README's commands as a user types them: every `prismfl train` line's config, --method and --set
values load and validate (a line that the config refuses fails here, not on a user's machine)."""

import re
import shlex
from pathlib import Path

import pytest

from prismfl.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def train_lines() -> list[str]:
    """Every `prismfl train ...` command in the README's code blocks, continuation lines joined and the
    comments and optional [...] parts dropped."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    lines = [re.sub(r"#.*", "", line) for line in joined.splitlines()]
    return [re.sub(r"\[[^\]]*\]", "", line).strip() for line in lines if line.strip().startswith("prismfl train")]


def test_the_readme_shows_train_commands():
    assert len(train_lines()) >= 5  # (so that the test below cannot pass on an empty list)


@pytest.mark.parametrize("line", train_lines())
def test_every_train_command_in_the_readme_loads_its_config(line):
    args = shlex.split(line)[2:]
    config, overrides = None, []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in ("--config", "-c"):
            config = ROOT / value
        elif flag == "--set":
            overrides.append(value)
        elif flag == "--method":
            overrides.append(f'train.method="{value}"')
        else:
            assert flag in ("--out", "--resume"), f"unknown option {flag} in: {line}"
    assert config is not None and config.exists(), line
    load_config(config, overrides)  # raises ConfigError with the line's mistake
