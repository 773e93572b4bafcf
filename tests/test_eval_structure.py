"""Issue 21: the structure of ``eval/`` and ``fcn3_lightning/metrics/``, read from the source (every import counted,
also those inside functions and under ``TYPE_CHECKING``): no import cycle, no module reading another's private names
or reaching into other objects' private attributes, no module attribute patched at run time."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"fcn3_lightning.eval": ROOT / "eval", "fcn3_lightning.metrics": ROOT / "fcn3_lightning" / "metrics"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for f in sorted(folder.glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


MODULES = _modules()


def _imports(tree: ast.AST) -> list[tuple[str, str, str, int]]:
    """(module, imported name or '', the local name it is bound to, line) of every absolute import in the tree."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "", a.asname or a.name.split(".")[0], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"relative import at line {node.lineno}"
            out += [(node.module, a.name, a.asname or a.name, node.lineno) for a in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for mod, name, _, _ in _imports(ast.parse(path.read_text())):
            target = f"{mod}.{name}" if f"{mod}.{name}" in MODULES else mod
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_checks_find_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert len(MODULES) > 20
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()) or [])}"


def test_no_private_names_across_modules():
    found = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        imported = set()  # local names bound by imports (modules, classes, functions)
        for mod, name, local, line in _imports(tree):
            if name.startswith("_") or any(part.startswith("_") and part != "__future__" for part in mod.split(".")):
                found.append(f"{path.name}:{line}: from {mod} import {name}")
            imported.add(local)
        for node in ast.walk(tree):
            # obj._private of anything but the object itself (self, cls) or its own class: another object's internals
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            # imported.attr = ...: patching another module (or an imported class or function) at run time
            if isinstance(node, ast.Assign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for sub in ast.walk(t):
                        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in imported:
                            found.append(f"{path.name}:{node.lineno}: assigns {ast.unparse(sub)}")
    assert not found, "\n".join(found)


def test_every_module_imports():
    for module in sorted(MODULES):
        importlib.import_module(module)
