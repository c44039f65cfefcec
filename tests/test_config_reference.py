"""docs/config.md is what prismfl.configref writes from config.py: every key, documented."""

from pathlib import Path

from prismfl import configref
from prismfl.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_config_reference_is_up_to_date():
    assert (ROOT / "docs" / "config.md").read_text() == configref.markdown(), (
        "docs/config.md is stale: run .venv/bin/python -m prismfl.configref docs/config.md"
    )


def test_every_key_of_a_resolved_config_is_in_the_reference_with_what_it_does():
    cfg = load_config(ROOT / "configs" / "fmnist-noniid.toml")
    keys = configref.keys(cfg)
    assert len(keys) > 60 and "train.broadcast_levels" in keys and "privacy.epsilon" in keys
    rows = {line.split("|")[1].strip().strip("`"): line for line in configref.markdown().splitlines()
            if line.startswith("| `")}  # fmt: skip
    assert sorted(rows) == sorted(keys)
    for key, row in rows.items():
        assert row.rstrip("| ").split("|")[-1].strip(), f"{key} has no description: write a comment beside it"


def test_comments_above_and_beside_a_field_are_its_description():
    from dataclasses import dataclass

    @dataclass
    class Example:
        a: int = 1  # beside a
        # above b, line 1
        # line 2
        b: str = "x"
        c: float = 0.5

    notes = configref.field_notes(Example)
    assert notes == {"a": "beside a", "b": "above b, line 1 line 2", "c": ""}


def test_the_methods_column_names_real_keys_and_methods():
    from prismfl.capabilities import METHODS

    keys = configref.keys()
    for key, methods in configref.METHODS_OF.items():
        assert key in keys, f"configref.METHODS_OF names {key}, which is no config key"
        assert methods and set(methods) <= set(METHODS), f"{key}: {methods} are not all methods"
