"""The shape of the code: no import cycle between `app`'s packages, `app` never imports `workers` or the entry
points, and the algorithms import nothing from the web, database or queue layers.

Read from the source (every import statement, including those inside functions), not from what happens to be
imported at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(source: str) -> ast.Module:
    """`ast.parse`, tried again on CPython 3.11's "AST constructor recursion depth mismatch" (gh-106905: the depth
    counter is shared between threads, so a parse elsewhere in the process at the same moment can trip it)."""
    for _ in range(4):
        try:
            return ast.parse(source)
        except SystemError:
            continue
    return ast.parse(source)


def imports_of(path: Path) -> set[str]:
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found: set[str] = set()
    for node in ast.walk(parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
    return found


def unit(module: str) -> str | None:
    """The node of the graph a module belongs to: `app.<package>` (or `app.<module>` for top-level modules)."""
    parts = module.split(".")
    if parts[0] != "app" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def app_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "app").rglob("*.py"):
        source = unit(".".join(path.relative_to(ROOT).with_suffix("").parts))
        assert source is not None
        edges = graph.setdefault(source, set())
        for target in map(unit, imports_of(path)):
            if target is not None and target != source:
                edges.add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_app_packages() -> None:
    graph = app_graph()
    assert {"app.jobs", "app.llm", "app.cache", "app.optimizers"} <= set(graph)
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_app_does_not_import_workers_or_the_entry_points() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imports_of(path) if m.split(".")[0] in ("workers", "promptopt"))
        for path in (ROOT / "app").rglob("*.py")
    }
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_algorithms_stay_pure() -> None:
    forbidden = ("fastapi", "starlette", "sqlalchemy", "redis", "saq", "asyncpg", "aiosqlite")
    for package in ("optimizers", "evaluation"):
        for path in (ROOT / "app" / package).rglob("*.py"):
            bad = sorted(m for m in imports_of(path) if m.split(".")[0] in forbidden)
            assert bad == [], f"{path.relative_to(ROOT)} imports {bad}"
            # and nothing that does: the jobs, datasets and cache packages, or the database
            reach = sorted(
                m for m in imports_of(path) if unit(m) in ("app.jobs", "app.datasets", "app.cache", "app.db")
            )
            assert reach == [], f"{path.relative_to(ROOT)} imports {reach}"
