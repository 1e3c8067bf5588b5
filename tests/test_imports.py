"""The package's import graph: one-way, and no module reaching into another's private names.

Read with ``ast`` from the source (nothing is imported), counting imports inside functions too:
a lazy import hides a cycle from Python's loader but not from a reader, who still has to hold
both modules in their head to follow either. Relative imports are resolved as Python does
(``importlib`` docs, "Package Relative Imports").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "nla"

# Cycles still open, each as the sorted set of modules in one strongly connected component,
# with who is removing it. Shrink only: an entry that is no longer a cycle fails the test too.
PENDING: dict[frozenset[str], str] = {}


def module_name(path: Path, root: Path = ROOT) -> tuple[str, bool]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def read_modules(root: Path = ROOT) -> dict[str, tuple[ast.Module, bool]]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        name, is_package = module_name(path, root)
        out[name] = (ast.parse(path.read_text(encoding="utf-8"), str(path)), is_package)
    return out


def imports_of(name: str, tree: ast.Module, is_package: bool, modules: set[str]
               ) -> tuple[set[str], list[tuple[str, str]]]:
    """(the package modules ``name`` imports anywhere in its body, the private names it takes
    from other modules as ``(module, name)``)."""
    found: set[str] = set()
    private: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "nla")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if source.split(".")[0] != "nla":
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:  # `from nla import metrics`: the submodule itself
                    found.add(sub)
                    continue
                found.add(source)
                if alias.name.startswith("_") and not alias.name.startswith("__") and source != name:
                    private.append((source, alias.name))
    found.discard(name)
    return found & modules, private


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str]]]]:
    modules = read_modules(root)
    graph, private = {}, {}
    for name, (tree, is_package) in modules.items():
        graph[name], private[name] = imports_of(name, tree, is_package, set(modules))
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(frozenset(component))
    return out


def test_the_walker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself can fail: a cycle through a function-level import and a private name
    taken through a relative import are both found."""
    pkg = tmp_path / "nla"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from nla.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from nla import a\n    from .c import _hidden\n")
    (pkg / "sub" / "c.py").write_text("_hidden = 1\n")
    graph, private = import_graph(pkg)
    assert graph["nla.a"] == {"nla.sub.b"}
    assert graph["nla.sub.b"] == {"nla.a", "nla.sub.c"}
    assert cycles(graph) == [frozenset({"nla.a", "nla.sub.b"})]
    assert private["nla.sub.b"] == [("nla.sub.c", "_hidden")]


def test_no_import_cycles() -> None:
    graph, _ = import_graph()
    assert len(graph) > 50  # the walker found the package
    found = set(cycles(graph))
    new = [sorted(c) for c in found if c not in PENDING]
    assert not new, f"import cycles: {new}"
    fixed = [sorted(c) for c in PENDING if c not in found]
    assert not fixed, f"no longer cycles, remove from PENDING: {fixed}"


def test_no_private_names_across_modules() -> None:
    _, private = import_graph()
    crossing = {name: names for name, names in private.items() if names}
    assert not crossing, f"modules importing another module's private names: {crossing}"


@pytest.mark.parametrize("name", ["nla.names", "nla.errors"])
def test_leaf_modules_import_nothing_of_ours(name: str) -> None:
    """The shared names and the error type sit below everything: any module may import them."""
    graph, _ = import_graph()
    assert graph[name] == set()
