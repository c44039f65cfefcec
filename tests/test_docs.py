"""The documentation stays a user's, and its links hold: the size limits of README and docs/, every relative
link (and its anchor) pointing at something that exists, every repository path quoted in backticks
existing, and every shipped config described in docs/configs.md."""

from __future__ import annotations

import fnmatch
import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def prose(page: Path) -> str:
    """A page without its code blocks (a `#` there is a comment, not a heading; a [x](y) is code)."""
    return FENCE.sub("", page.read_text())


def test_sizes():
    assert len((ROOT / "README.md").read_text()) <= 8_000
    docs = sorted((ROOT / "docs").rglob("*.md"))
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text()) for p in docs}
    assert {p: n for p, n in sizes.items() if n > 40_000} == {}
    assert sum(sizes.values()) <= 150_000, sizes


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", prose(page))


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_and_anchors_exist(page):
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        assert where.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and where.suffix == ".md":
            assert anchor in anchors(where), f"{page.name}: link to {target}: no such heading in {where.name}"


def quoted_paths(page: Path) -> list[str]:
    """Repository paths a page quotes in backticks (configs/, docs/, benchmarks/, src/, tests/), braces
    expanded ({0,1,2}); globs stay globs."""
    out = []
    for span in re.findall(r"`([^`\s]+)`", page.read_text()):
        span = span.split("::")[0]  # a test's node id: its file
        if not re.match(r"(configs|docs|benchmarks|src|tests)/", span):
            continue
        match = re.search(r"\{([^}]*)\}", span)
        options = match.group(1).split(",") if match else [""]
        out += [span[: match.start()] + o + span[match.end() :] for o in options] if match else [span]
    return out


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_quoted_repository_paths_exist(page):
    for path in quoted_paths(page):
        assert glob.glob(str(ROOT / path)), f"{page.name} quotes {path}, which does not exist"


def test_every_shipped_config_is_described():
    text = (ROOT / "docs" / "configs.md").read_text()
    for config in sorted((ROOT / "configs").glob("*.toml")):
        assert config.name in text, f"configs/{config.name} is not in docs/configs.md"


def test_every_image_and_benchmark_file_in_docs_is_cited():
    """docs/img and docs/benchmarks hold only what a page cites (raw results of superseded tables leave):
    by its path, its name, a quoted glob, or its folder quoted as `docs/benchmarks/grid/`."""
    cited = "\n".join(p.read_text() for p in PAGES)
    quoted = [ROOT / q for page in PAGES for q in quoted_paths(page)]
    for f in sorted([*(ROOT / "docs" / "img").rglob("*"), *(ROOT / "docs" / "benchmarks").rglob("*")]):
        if f.is_file():
            rel = f.relative_to(ROOT).as_posix()
            by_glob = any(fnmatch.fnmatch(str(f), str(q)) or q.is_dir() and q in f.parents for q in quoted)
            assert f.name in cited or by_glob, f"{rel} is cited by no page: delete it, or cite it"
