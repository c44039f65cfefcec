"""docs/cli.md, the reference of every `prismfl` command, generated from the command line itself (cli.py's
typer app, walked as the click command tree it builds): each command's help text, usage, arguments and
options with their types and defaults. A test keeps the file equal to what this writes, so an option cannot
be added, renamed or re-documented without the reference following.

Write it: .venv/bin/python -m prismfl.cliref docs/cli.md
"""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path

import click
import typer

HEADER = """# Command-line reference

Every `prismfl` command with its arguments and options. Generated from `src/prismfl/cli.py` by
`python -m prismfl.cliref docs/cli.md`; a test fails when this file and the code differ. `prismfl COMMAND
--help` prints the same in a terminal.

Every error (a bad option, a config the checks refuse, a file that cannot be read) is one line
`prismfl: error: ...` on stderr and exit code 2; an interrupted `train` exits with 130 and resumes with
`--resume`. Configuration keys (`--set key=value`) are in [config.md](config.md).
"""


def _default(param: click.Parameter) -> str:
    value = param.default
    if param.required or value is None or value == [] or value == ():
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and math.isinf(value):
        return "`inf`"
    return f"`{value}`"


def _kind(param: click.Parameter) -> str:
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    name = param.type.name
    return {"text": "text", "integer": "integer", "float": "number", "path": "path"}.get(name, name)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _help(cmd: click.Command, param: click.Parameter) -> str:
    """An option's help; an argument's from typer's declaration (typer leaves it off the click argument)."""
    if getattr(param, "help", None):
        return param.help  # type: ignore[attr-defined]
    from typer.utils import get_params_from_function

    declared = get_params_from_function(cmd.callback).get(param.name or "")
    return getattr(declared.default, "help", None) or "" if declared else ""


def _names(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return param.human_readable_name.upper()
    shown = sorted(param.opts, key=len, reverse=True)  # --long first, then -s
    return ", ".join(f"`{o}`" for o in shown)


def commands() -> dict[str, click.Command]:
    """The `prismfl` commands, in the order cli.py declares them."""
    from prismfl.cli import app

    group = typer.main.get_command(app)
    return dict(group.commands)  # type: ignore[attr-defined]


def markdown() -> str:
    parts = [HEADER, "| command | what it does |", "|---|---|"]
    cmds = commands()
    for name, cmd in cmds.items():
        first = inspect.cleandoc(cmd.help or "").split("\n\n")[0]
        parts.append(f"| [`{name}`](#prismfl-{name}) | {_cell(first)} |")
    parts.append("")
    for name, cmd in cmds.items():
        ctx = click.Context(cmd, info_name=f"prismfl {name}")
        usage = " ".join([f"prismfl {name}", *cmd.collect_usage_pieces(ctx)])
        parts += [f"## prismfl {name}", "", inspect.cleandoc(cmd.help or ""), "", "```", usage, "```", ""]
        params = [p for p in cmd.params if p.name != "help"]
        if params:
            parts += ["| argument or option | type | default | what it does |", "|---|---|---|---|"]
            for p in params:
                required = " (required)" if p.required else ""
                parts.append(f"| {_names(p)} | {_kind(p)} | {_default(p)} | {_cell(_help(cmd, p))}"
                             f"{required} |")  # fmt: skip
            parts.append("")
    return "\n".join(parts)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/cli.md")
    out.write_text(markdown())
    print(f"wrote {out} ({len(commands())} commands)")


if __name__ == "__main__":
    main()
