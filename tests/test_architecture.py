"""Layering of the project's own modules, read from the source (every import statement, including those inside
functions, which run later but still tie the modules together):

- no import cycle among the project's modules;
- nba_core (the library + client) imports nothing from the service (app, worker, migrations, bench);
- no private name (`_x`) is imported across top-level packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nba_core", "app", "worker", "bench", "migrations")
SERVICE = ("app", "worker", "bench", "migrations")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods[module_name(path)] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported project module, imported name or '') for each import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, ""))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub, "") if sub in mods else (target, alias.name))
            elif (isinstance(child, ast.Call) and getattr(child.func, "attr", getattr(child.func, "id", None))
                  == "import_module" and child.args and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)):
                found.append((child.args[0].value, ""))  # importlib.import_module("pkg.mod") is an import too
            visit(child)

    visit(tree)
    # keep project modules only, resolved to the nearest existing module (a.b.c -> a.b when c is a name)
    out = []
    for target, imported in found:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.append((target, imported))
    return out


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: {t for t, _ in imports_of(name, path, mods)} for name, path in mods.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_detector_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_project_modules():
    cycles = strongly_connected(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_library_imports_nothing_from_the_service():
    graph = import_graph()
    bad = sorted(f"{m} imports {t}" for m, ts in graph.items() if m.split(".")[0] == "nba_core"
                 for t in ts if t.split(".")[0] in SERVICE)
    assert not bad, bad


def test_no_private_names_imported_across_packages():
    mods = project_modules()
    bad = []
    for name, path in mods.items():
        for target, imported in imports_of(name, path, mods):
            private = imported.startswith("_") or target.rpartition(".")[2].startswith("_")
            if private and target.split(".")[0] != name.split(".")[0] and not imported.startswith("__"):
                bad.append(f"{name} imports {target}.{imported}".rstrip("."))
    assert not bad, bad
