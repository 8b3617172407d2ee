"""The package layout: imports between qafel's packages point one way, and no two packages import each other.

Every module under ``src/qafel`` is read with ``ast`` (nothing is imported), and every ``qafel.*`` import in it,
at module level or inside a function, is an arrow from its package to the imported one. Arrows go down the
levels below (entry points -> experiment -> sim -> quantizers, models, data -> signals -> errors, the last two
shared by all), never up and never sideways between packages of the same level.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: package -> level: a package may import packages of a strictly lower level (and itself).
LEVELS = {
    "qafel": 4,  # the root: the lazy public API (qafel.compose, qafel.run, ...)
    "sweep": 3,
    "report": 3,
    "experiment": 2,
    "sim": 1,
    "quantizers": 0,
    "models": 0,
    "data": 0,
    "signals": -1,  # shared: SIGTERM/preemption handling (the engine checks for a pending preemption)
    "errors": -2,  # shared: the exception types and exit codes
}


def package_of(module: str) -> str:
    """``qafel.sim.engine`` -> ``sim``; ``qafel.errors`` -> ``errors``; ``qafel`` -> ``qafel``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "qafel"


def module_name(path: Path, root: Path = SRC) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def qafel_imports(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, imported module) for every ``qafel`` import in the file, function-level ones included."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "qafel"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "qafel":
                # ``from qafel import system`` imports the submodule qafel.system
                subs = [f"{target}.{a.name}" for a in node.names] if target == "qafel" else [target]
                found += [(node.lineno, s) for s in subs]
    return found


def package_arrows(root: Path = SRC) -> dict[tuple[str, str], list[str]]:
    """(from package, to package) -> the imports that make the arrow (``file:line -> module``)."""
    arrows: dict[tuple[str, str], list[str]] = {}
    for path in sorted((root / "qafel").rglob("*.py")):
        src = package_of(module_name(path, root))
        for line, target in qafel_imports(path, root):
            dst = package_of(target)
            if dst != src:
                arrows.setdefault((src, dst), []).append(f"{path.relative_to(root)}:{line} -> {target}")
    return arrows


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Every elementary cycle's node list found by a depth-first search (enough to report one or more)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_package_is_known_and_documented():
    packages = {p.name for p in (SRC / "qafel").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in (SRC / "qafel").glob("*.py") if p.stem != "__init__"}
    assert packages | modules | {"qafel"} == set(LEVELS), "a new package or top-level module needs a level here"
    for name in packages:
        doc = ast.get_docstring(ast.parse((SRC / "qafel" / name / "__init__.py").read_text()))
        assert doc and "import" in doc, f"qafel/{name}/__init__.py: say what the package owns and may import"


def test_imports_point_down_the_levels():
    upward = [f"{a} -> {b}: " + "; ".join(where) for (a, b), where in sorted(package_arrows().items())
              if LEVELS[b] >= LEVELS[a]]
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_no_cycles_between_packages():
    found = cycles(set(package_arrows()))
    assert not found, "package import cycles: " + ", ".join(" -> ".join(c) for c in found)


def test_report_build_plots_tables_one_way():
    """Inside qafel.report, build -> plots -> tables (the tables never import the plots)."""
    tables = {t for _, t in qafel_imports(SRC / "qafel" / "report" / "tables.py")}
    plots = {t for _, t in qafel_imports(SRC / "qafel" / "report" / "plots.py")}
    assert not {t for t in tables if t.startswith("qafel.report")}
    assert "qafel.report.build" not in plots and "qafel.report" not in plots


@pytest.mark.parametrize("edges, expected", [
    ({("a", "b"), ("b", "c")}, []),
    ({("a", "b"), ("b", "a")}, [["a", "b", "a"]]),
    ({("a", "b"), ("b", "c"), ("c", "a")}, [["a", "b", "c", "a"]]),
])
def test_the_cycle_finder_finds_cycles(edges, expected):
    assert cycles(edges) == expected


def test_the_checks_see_function_level_and_relative_imports(tmp_path):
    """A stand-in tree where sim imports upward, at function level and relatively: the checks must fail it."""
    probe = tmp_path / "qafel" / "sim" / "probe.py"
    probe.parent.mkdir(parents=True)
    (tmp_path / "qafel" / "__init__.py").write_text("")
    (tmp_path / "qafel" / "sim" / "__init__.py").write_text("")
    probe.write_text("import os\nfrom ..experiment import runner\n\n\ndef f():\n"
                     "    from qafel.sweep import main\n    import qafel.sim.engine\n")
    assert sorted(t for _, t in qafel_imports(probe, tmp_path)) == ["qafel.experiment", "qafel.sim.engine",
                                                                     "qafel.sweep"]
    arrows = package_arrows(tmp_path)
    assert set(arrows) == {("sim", "experiment"), ("sim", "sweep")}
    assert all(LEVELS[b] >= LEVELS[a] for a, b in arrows)  # both point up: test_imports_point_down_the_levels fails
