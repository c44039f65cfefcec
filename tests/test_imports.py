"""The package's import graph has no cycles (benchmarks/import_graph.py walks it with ast)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "benchmarks" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prismfl_has_no_import_cycles():
    graph = load()
    edges = graph.graph()
    assert len(edges) > 40 and "prismfl.fl.engine" in edges
    assert graph.cycles(edges) == []


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = load()
    pkg = tmp_path / "prismfl"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from prismfl.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from prismfl import c\n")
    (pkg / "c.py").write_text("import prismfl.a\n")
    (pkg / "d.py").write_text("from prismfl import a\n")
    assert graph.cycles(graph.graph(tmp_path)) == [["prismfl.a", "prismfl.c", "prismfl.sub.b"]]
