"""The package's import graph has no circles: no two files of ``dspark`` import each other, directly or through
others, counting the imports inside functions (a lazy import hides a circle from Python, not from a reader) and
leaving out ``if TYPE_CHECKING:`` blocks (annotations only). Drafters stay below the exporters and the targets."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dspark"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str], name: str | None = None) -> set[str]:
    """The package modules ``path`` imports (``from a.b import c`` is module ``a.b.c`` when that is a file)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
               for body in node.body for n in ast.walk(body)}
    name = name or _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
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
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle_between_files_of_the_package():
    assert _cycles(_graph()) == []


def test_the_checker_finds_a_circle_and_ignores_type_checking_imports(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dspark.x import y\n"
                      "def f():\n    from dspark.z import w\n")
    assert _imports(module, {"dspark.x", "dspark.x.y", "dspark.z"}, name="dspark.m") == {"dspark.z"}


def test_drafters_import_neither_exporters_nor_target_backends():
    # The checkpoint readers are plain torch (V4's init_from_target reads the target's own layers through them).
    readers = ("dspark.targets.weights", "dspark.targets.fp8")
    graph = _graph()
    upward = {(m, dep) for m, deps in graph.items() if m.startswith("dspark.drafters")
              for dep in deps if dep.startswith(("dspark.export", "dspark.targets", "dspark.train"))
              and dep not in readers}
    assert upward == set()


def _missing_names(path: Path) -> list[str]:
    """``from dspark.x import y`` lines of ``path`` (at any depth: the scripts import lazily) whose ``y`` is neither
    an attribute nor a submodule of ``dspark.x``."""
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dspark":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                    missing.append(f"{path.name}: from {node.module} import {alias.name}")
    return missing


def test_scripts_outside_the_package_import_names_that_exist(tmp_path):
    # benchmarks/, tools/ and launcher/ import dspark lazily inside functions that no test may run (a benchmark's
    # main): a name moved inside the package must not leave them pointing at nothing.
    root = Path(__file__).resolve().parents[1]
    scripts = sorted(p for folder in ("benchmarks", "tools", "launcher") for p in (root / folder).glob("*.py"))
    assert len(scripts) > 20
    assert [m for p in scripts for m in _missing_names(p)] == []
    stale = tmp_path / "stale.py"
    stale.write_text("def main():\n    from dspark.drafters import load_drafter\n")
    assert _missing_names(stale) == ["stale.py: from dspark.drafters import load_drafter"]
