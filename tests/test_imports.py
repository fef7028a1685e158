"""The import graph of the project's own modules: no cycle, nothing imported upward.

ARCHITECTURE.md ("Layout"): nothing imports in a circle, `socratic/` imports none of the other
folders, `pipelines/` never imports `benchmarks/`, and `benchmarks/` never imports `tests/`.
The graph is read from the source with `ast`, so a function-level import (the usual way round
a cycle) counts like a module-level one; only `if TYPE_CHECKING:` blocks, which never run, are
left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.support.paths import REPO

PACKAGES = ("socratic", "pipelines", "trainers", "serve", "benchmarks", "cluster")
# (importing folder, imported folders it must not import)
FORBIDDEN = (
    ("socratic", ("pipelines", "trainers", "serve", "benchmarks", "tests")),
    ("pipelines", ("benchmarks", "tests")),
    ("benchmarks", ("tests",)),
)
# Known edges that break a rule above, each with what removes it.
EXPECTED_VIOLATIONS: set[tuple[str, str]] = set()


def project_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` under the project's folders."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _runtime_nodes(tree: ast.AST) -> Iterable[ast.AST]:
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, known: Iterable[str]) -> str | None:
    """The module `name` names: itself or its nearest enclosing known module; None if not ours."""
    known = set(known)
    parts = name.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def imports_of(module: str, path: Path, known: Iterable[str]) -> set[str]:
    """The modules of `known` that `module` imports anywhere in its file."""
    known = set(known)
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upward
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.append(sub if _resolve(sub, known) == sub else base)
        for name in names:
            target = _resolve(name, known)
            if target is not None and target != module:
                out.add(target)
    return out


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports; `tests.*` are targets only, never nodes."""
    modules = project_modules(root)
    known = set(modules) | set(project_modules(root, ["tests"]))
    return {m: imports_of(m, p, known) for m, p in modules.items()}


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None: a depth-first search for a back edge."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: Mapping[str, Iterable[str]]) -> set[tuple[str, str]]:
    """The (importer, imported) edges that break a rule of `FORBIDDEN`."""
    bad = set()
    for module, targets in graph.items():
        for folder, banned in FORBIDDEN:
            if module.split(".")[0] != folder:
                continue
            bad |= {(module, t) for t in targets if t.split(".")[0] in banned}
    return bad


def longest_function(folder: Path) -> tuple[str, int]:
    """The longest function (or method) under `folder` as (`file:qualname`, lines)."""
    best = ("", 0)
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        stack: list[tuple[ast.AST, str]] = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                name = prefix
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}{child.name}."
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > best[1]:
                        where = f"{path.relative_to(folder.parent)}:{name[:-1]}"
                        best = (where, lines)
                stack.append((child, name))
    return best


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"x": {"y"}, "y": {"x"}}) == ["x", "y", "x"]


def test_a_function_level_import_is_an_edge(tmp_path: Path) -> None:
    """The usual way round a cycle, a lazy import inside a function, is still a cycle."""
    pkg = tmp_path / "pipelines"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pipelines.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pipelines import a\n    return a\n")
    modules = project_modules(tmp_path, ["pipelines"])
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    assert graph["pipelines.a"] == {"pipelines.b"}
    assert graph["pipelines.b"] == {"pipelines.a"}
    assert find_cycle(graph) == ["pipelines.a", "pipelines.b", "pipelines.a"]


def test_no_import_cycle_between_the_projects_modules() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "pipelines.annotate" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_nothing_imports_upward() -> None:
    bad = upward_imports(import_graph()) - EXPECTED_VIOLATIONS
    assert not bad, "imports against ARCHITECTURE.md's layout: " + ", ".join(
        f"{a} -> {b}" for a, b in sorted(bad)
    )
    stale = EXPECTED_VIOLATIONS - upward_imports(import_graph())
    assert not stale, f"no longer imported, drop from EXPECTED_VIOLATIONS: {sorted(stale)}"


def test_report_the_longest_function_in_pipelines() -> None:
    """Not a limit: a number to watch (run with -s to see it)."""
    where, lines = longest_function(REPO / "pipelines")
    assert where and lines > 0
    print(f"\nlongest function in pipelines/: {where}, {lines} lines")
