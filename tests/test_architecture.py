"""The house: imports run one way, private torch APIs stay in ir/capture.py, rooms stay small.

The rooms and their order (an arrow may only point to the same room or one below it)::

    flexc/ -> runtime/ -> passes/ -> ir/ -> kernels/

Every import counts: module level, inside functions, under ``TYPE_CHECKING``. The scanner reads
the source (AST), so a bent import is found even if it never runs in a test.
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib
from typing import Iterator

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROOMS = {"flexc": 4, "runtime": 3, "passes": 2, "ir": 1, "kernels": 0}
"""Folder -> rank; ``flexc.<room>`` is installed from folder ``<room>`` (pyproject's package-dir)."""
PRIVATE_TORCH_OK = {"ir/capture.py"}
MAX_MODULE_LINES = 500
LONG_MODULES = {}
"""Modules allowed past MAX_MODULE_LINES, with the README's reason (none today)."""
MAX_FUNCTION_LINES = 80


@dataclasses.dataclass(frozen=True)
class Violation:
    path: str
    line: int
    what: str


def _room_of_module(name: str) -> str | None:
    """The room a dotted module name lives in: ``flexc.runtime.engine`` -> runtime, ``flexc.cli`` -> flexc."""
    parts = name.split(".")
    if parts[0] != "flexc":
        return None
    if len(parts) > 1 and parts[1] in ROOMS and parts[1] != "flexc":
        return parts[1]
    return "flexc"


def _module_name(room: str, rel: pathlib.Path) -> str:
    stem = list(rel.with_suffix("").parts)
    if stem[-1] == "__init__":
        stem = stem[:-1]
    base = ["flexc"] if room == "flexc" else ["flexc", room]
    return ".".join(base + stem)


def _imports(tree: ast.AST, module: str, is_pkg: bool) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import statement, relative ones resolved."""
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            if target == "flexc":         # ``from flexc import runtime`` names a room
                for a in node.names:
                    yield node.lineno, f"{target}.{a.name}"


def _private_torch(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for n in names:
                if n.startswith("torch._") or "._" in n and n.startswith("torch."):
                    yield node.lineno, n
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "torch" and len(chain) >= 1:
                path = ".".join(["torch", *reversed(chain)])
                if not path.startswith("torch.ops."):      # aten op names are the dispatcher's public surface
                    yield node.lineno, path


def scan(root: pathlib.Path) -> list[Violation]:
    """Every bent arrow, private torch use outside ir/capture.py, long module and long function under ``root``."""
    found: list[Violation] = []
    for room, rank in ROOMS.items():
        folder = root / room
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else ():
            rel = path.relative_to(folder)
            shown = str(path.relative_to(root))
            src = path.read_text()
            tree = ast.parse(src, filename=shown)
            module = _module_name(room, rel)
            for line, target in _imports(tree, module, rel.name == "__init__.py"):
                other = _room_of_module(target)
                if other is not None and ROOMS[other] > rank:
                    found.append(Violation(shown, line, f"{room}/ imports {target} ({other}/ is above {room}/)"))
            if shown not in PRIVATE_TORCH_OK:
                for line, name in _private_torch(tree):
                    found.append(Violation(shown, line, f"private torch API {name} outside ir/capture.py"))
            lines = len(src.splitlines())
            if lines > MAX_MODULE_LINES and shown not in LONG_MODULES:
                found.append(Violation(shown, 1, f"{lines} lines (> {MAX_MODULE_LINES})"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        found.append(Violation(shown, node.lineno, f"function {node.name} has {n} lines "
                                                                    f"(> {MAX_FUNCTION_LINES})"))
    return sorted(set(found), key=lambda v: (v.path, v.line, v.what))


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """flexc module -> the flexc modules it imports (every import statement, wherever it is)."""
    files: dict[str, ast.AST] = {}
    for room in ROOMS:
        folder = root / room
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else ():
            rel = path.relative_to(folder)
            files[_module_name(room, rel)] = (ast.parse(path.read_text()), rel.name == "__init__.py")
    graph: dict[str, set[str]] = {}
    for module, (tree, is_pkg) in files.items():
        deps = set()
        for _, target in _imports(tree, module, is_pkg):
            while target and target not in files:      # ``from flexc.runtime.batch import SeqKind``
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                deps.add(target)
        graph[module] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_cycles():
    """No two modules import each other, directly or around a loop (lazy and TYPE_CHECKING imports count:
    they only hide a cycle)."""
    cycles = [c for c in import_cycles(import_graph(ROOT)) if c != ["flexc", "flexc.cli"]]
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_the_house_has_no_bent_arrow_and_no_long_room():
    """Every import of flexc's own modules points down the room order, and torch._* is used only in capture."""
    found = scan(ROOT)
    assert not found, "\n".join(f"{v.path}:{v.line}: {v.what}" for v in found)


def _write(root: pathlib.Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_scanner_finds_a_bent_import_in_a_fixture_tree(tmp_path):
    """The scanner is not vacuous: a runtime -> front-door import, a TYPE_CHECKING one, a function-level one,
    a relative one and a torch._ use are each reported, and a downward import is not."""
    _write(tmp_path, "ir/graph.py", "import torch\nfrom flexc.kernels import lora\n")
    _write(tmp_path, "runtime/engine.py", "from typing import TYPE_CHECKING\n"
                                          "if TYPE_CHECKING:\n    from flexc.compiler import CompiledModel\n"
                                          "def f():\n    import flexc.models\n")
    _write(tmp_path, "passes/prune.py", "from ..runtime import engine\n")
    _write(tmp_path, "kernels/lora.py", "import torch\nx = torch._dynamo.reset\n")
    _write(tmp_path, "ir/__init__.py", "")
    found = {(v.path, v.line) for v in scan(tmp_path)}
    assert found == {("runtime/engine.py", 3), ("runtime/engine.py", 5), ("passes/prune.py", 1),
                     ("kernels/lora.py", 2)}
    msgs = [v.what for v in scan(tmp_path)]
    assert any("flexc.compiler" in m for m in msgs) and any("torch._dynamo" in m for m in msgs)


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_every_room_is_a_folder(room):
    """The rooms exist where pyproject's package-dir says (a renamed room would make the scan vacuous)."""
    assert (ROOT / room / "__init__.py").is_file()
