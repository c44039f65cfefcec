"""docs/cli.md is what prismfl.cliref writes from the CLI: every command and option, documented."""

from pathlib import Path

from prismfl import cliref

ROOT = Path(__file__).resolve().parents[1]


def test_the_cli_reference_is_up_to_date():
    assert (ROOT / "docs" / "cli.md").read_text() == cliref.markdown(), (
        "docs/cli.md is stale: run .venv/bin/python -m prismfl.cliref docs/cli.md"
    )


def test_every_command_and_option_is_in_the_reference():
    text = cliref.markdown()
    commands = cliref.commands()
    assert {"train", "sample", "export", "evaluate", "info", "privacy"} <= set(commands)
    for name, cmd in commands.items():
        assert f"## prismfl {name}\n" in text
        for param in cmd.params:
            for opt in getattr(param, "opts", []) if param.param_type_name == "option" else []:
                assert f"`{opt}`" in text, f"prismfl {name} {opt} is missing from docs/cli.md"
