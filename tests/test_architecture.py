"""The shape of the package: no import cycle anywhere (lazy and ``TYPE_CHECKING`` imports included), every module
importable on its own, no module reading another module's private names or patching another module at run time.

The import graph is read from the source with :mod:`ast` (every ``import`` statement, wherever it stands), so a
cycle hidden behind an import inside a function still shows. Two graphs: the modules themselves, and the rooms
(the subpackages ``data``, ``training``, ``eval``, ... and each top-level module), so that two folders importing
each other through different modules also show.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = "fcn3_lightning"
#: where each package's sources live (pyproject.toml's package-dir: callbacks/ and eval/ sit at the top level)
FOLDERS = {ROOT: REPO / "fcn3_lightning", f"{ROOT}.callbacks": REPO / "callbacks", f"{ROOT}.eval": REPO / "eval"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module it imports (a package stands for its __init__)
    line: int
    names: tuple[str, ...] = ()  # ``from target import names`` (names that are not submodules)


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its own name, for its ``__init__.py``)."""
    out: dict[str, Path] = {}
    for base, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if base == ROOT and parts[0] in ("callbacks", "eval"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((base, *parts))] = path
    return out


MODULES = _modules()
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def _resolve(module: str, level: int, name: str | None) -> str:
    """The absolute name of a (possibly relative) ``from`` import in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if module in PACKAGES else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(module: str) -> Iterator[Import]:
    """Every import of ``module`` into this package, wherever it stands (functions, ``if TYPE_CHECKING``, ``try``,
    and ``"module:function"`` strings that importlib imports)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == ROOT or alias.name.startswith(ROOT + "."):
                    yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node.level, node.module)
            if target != ROOT and not target.startswith(ROOT + "."):
                continue
            names = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    yield Import(module, sub, node.lineno)
                else:
                    names.append(alias.name)
            if names:
                yield Import(module, target, node.lineno, tuple(names))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
            # "package.module:function", imported by importlib (the command table's commands): an import all the same
            target = node.value.split(":", 1)[0]
            if target in MODULES:
                yield Import(module, target, node.lineno)


def module_graph() -> dict[str, dict[str, int]]:
    """``graph[a][b]``: the line where module ``a`` imports ``b``. Importing ``x.y.z`` runs ``x.y``'s ``__init__``
    first, so an import also points at the packages above its target (not those above the importer: they are
    already running)."""
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for m in MODULES:
        own = set(_ancestors(m)) | {m}
        for imp in imports_of(m):
            for t in [*_ancestors(imp.target), imp.target]:
                if t in MODULES and t not in own:
                    graph[m].setdefault(t, imp.line)
    return graph


def room(module: str) -> str:
    """The room a module belongs to: its subpackage (``fcn3_lightning.data``), or itself for a top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2])


def room_graph() -> dict[str, dict[str, tuple[str, str, int]]]:
    """``graph[a][b]``: one import (importer, target, line) by which room ``a`` imports room ``b``."""
    graph: dict[str, dict[str, tuple[str, str, int]]] = {}
    for m, targets in module_graph().items():
        graph.setdefault(room(m), {})
        for t, line in targets.items():
            if room(t) != room(m) and room(t) != ROOT:
                graph[room(m)].setdefault(room(t), (m, t, line))
    return graph


def cycles(graph: dict[str, dict]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan): the sets of nodes that import each other,
    each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(comps)


def _describe(graph: dict[str, dict], comp: list[str], where) -> str:
    """A cycle as every import between its members, one a line, with where it stands."""
    edges = [f"{a} -> {b}  ({where(a, b)})" for a in comp for b in sorted(graph[a]) if b in comp]
    return "cycle through " + ", ".join(comp) + ":\n    " + "\n    ".join(edges)


def test_the_graph_sees_every_kind_of_import() -> None:
    # the reader itself: a lazy import in a function and one under TYPE_CHECKING are edges like any other
    assert "fcn3_lightning.forecaster" in module_graph()["fcn3_lightning"]  # lazy, in __getattr__
    assert "fcn3_lightning.data.datamodule" in module_graph()["fcn3_lightning.data"]  # lazy, in __getattr__
    assert "fcn3_lightning.eval.reports" in module_graph()["fcn3_lightning.__main__"]  # "module:function", importlib
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_module_import_cycle() -> None:
    graph = module_graph()
    found = cycles(graph)
    report = "\n  ".join(_describe(graph, c, lambda a, b: f"{MODULES[a].relative_to(REPO)}:{graph[a][b]}") for c in found)
    assert not found, f"{len(found)} import cycle(s) between modules:\n  {report}"


def test_no_import_cycle_between_rooms() -> None:
    graph = room_graph()
    found = cycles(graph)

    def where(a: str, b: str) -> str:
        m, t, line = graph[a][b]
        return f"{MODULES[m].relative_to(REPO)}:{line} imports {t}"

    report = "\n  ".join(_describe(graph, c, where) for c in found)
    assert not found, f"{len(found)} import cycle(s) between subpackages / top-level modules:\n  {report}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def bound_modules(m: str, tree: ast.AST) -> dict[str, str]:
    """Local name -> the module of this package it stands for, for every import in module ``m``'s ``tree``."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else ROOT
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(m, node.level, node.module)
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{target}.{alias.name}"
    return bound


def private_reads(m: str, source: str, where: str) -> list[str]:
    """``from x import _name`` and ``x._name`` (``x`` a module of the package, bound by an import) in module ``m``
    whose source is ``source``, when ``x`` is another module."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(m, node.level, node.module)
            for alias in node.names:
                if f"{target}.{alias.name}" not in MODULES and target in MODULES and target != m and _private(alias.name):
                    found.append(f"{where}:{node.lineno} from {target} import {alias.name}")
    bound = bound_modules(m, tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain = []
            value: ast.expr = node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                target = ".".join([bound[value.id], *reversed(chain)])
                if target in MODULES and target != m:
                    found.append(f"{where}:{node.lineno} {target}.{node.attr}")
    return found


def test_the_private_name_check_sees_both_forms() -> None:
    source = """
import fcn3_lightning.data.stats
import fcn3_lightning.io as fio
from fcn3_lightning.model import noise
from fcn3_lightning.channels import _LEVEL_RE, parse_channel
from . import _umask_from_proc
def f(self):
    return fcn3_lightning.data.stats._x, fio._umask_from_proc, noise._y, self._z, noise.__name__, parse_channel
"""
    found = [f.split(" ", 1)[1] for f in private_reads("fcn3_lightning.grid", source, "grid.py")]
    assert found == [
        "from fcn3_lightning.channels import _LEVEL_RE",
        "from fcn3_lightning import _umask_from_proc",
        "fcn3_lightning.data.stats._x",
        "fcn3_lightning.io._umask_from_proc",
        "fcn3_lightning.model.noise._y",
    ]
    # a module's own private names are its own business
    assert private_reads("fcn3_lightning.io", "import fcn3_lightning.io as me\nme._UMASK_AT_IMPORT", "io.py") == []


def test_no_module_reads_another_modules_private_names() -> None:
    found = [f for m, path in MODULES.items() for f in private_reads(m, path.read_text(), f"{path.relative_to(REPO)}")]
    assert not found, f"{len(found)} read(s) of another module's private names:\n  " + "\n  ".join(found)


def patches(m: str, source: str, where: str) -> list[str]:
    """Assignments to an attribute of another module of the package (``mod.name = ...``, ``mod.name += ...``): run-time
    patching, which makes a module behave differently from what its source says."""
    found = []
    tree = ast.parse(source)
    bound = bound_modules(m, tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in bound:
                        if bound[sub.value.id] != m:
                            found.append(f"{where}:{node.lineno} assigns {bound[sub.value.id]}.{sub.attr}")
    return found


def test_the_patch_check_sees_module_attribute_assignments() -> None:
    source = "import fcn3_lightning.metrics.base as base\nfrom fcn3_lightning import io\nbase.region_weights = f\nio.X += 1\n"
    found = [f.split(" ", 1)[1] for f in patches("fcn3_lightning.eval.score", source, "score.py")]
    assert found == ["assigns fcn3_lightning.metrics.base.region_weights", "assigns fcn3_lightning.io.X"]


def test_no_module_patches_another_module() -> None:
    found = [f for m, path in MODULES.items() for f in patches(m, path.read_text(), f"{path.relative_to(REPO)}")]
    assert not found, f"{len(found)} run-time patch(es) of another module:\n  " + "\n  ".join(found)


#: run in a fresh interpreter: the third-party libraries the package imports are loaded once, then every module of
#: the package is imported in a forked child that has none of the package's modules yet (a fresh process as far as
#: the package is concerned, without paying torch's import time ~100 times)
_IMPORT_EACH = """
import importlib, os, sys, traceback
for name in filter(None, sys.argv[2].split(",")):
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # an optional extra (cloud, dev): the package imports it where it is needed, with its own message
assert not [m for m in sys.modules if m == "fcn3_lightning" or m.startswith("fcn3_lightning.")]
failed = 0
for module in sys.argv[1].split(","):
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException:
            print(f"--- import {module} failed:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    failed += status != 0
sys.exit(1 if failed else 0)
"""


def _third_party() -> list[str]:
    """The top-level names of every library the package imports, anywhere."""
    names = set()
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return sorted(n for n in names - {ROOT, "__future__"} if n not in sys.stdlib_module_names)


def test_every_module_imports_on_its_own() -> None:
    # an import that only works after some other module was imported first (a cycle entered from the wrong side, a
    # missing import) fails here
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, ",".join(sorted(MODULES)), ",".join(_third_party())],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"modules that do not import in a fresh process:\n{done.stderr[-6000:]}"


def test_the_import_check_reports_a_failing_module() -> None:
    # the checker itself: a module that cannot be imported makes it fail, naming the module
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, "fcn3_lightning.channels,fcn3_lightning.no_such_module", ""],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "import fcn3_lightning.no_such_module failed" in done.stderr
    assert "fcn3_lightning.channels failed" not in done.stderr
