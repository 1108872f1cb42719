"""Dependencies run one way: the import graph of our packages has no cycle and no upward edge.

Layers, bottom to top (docs/architecture.md has the picture)::

    relay.protocol  <  coordinator  <  region  <  relay  <  relaymesh

A module may import its own layer and the layers below it. Every import
counts: top level, inside functions, and under ``TYPE_CHECKING``, since an
import moved into a function to dodge a cycle is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("relay", "coordinator", "region", "relaymesh")
LAYERS = ("relay.protocol", "coordinator", "region", "relay", "relaymesh")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                # "from pkg import mod" names a module when pkg.mod is one of ours
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    best = -1
    for i, prefix in enumerate(LAYERS):
        inside = module == prefix or module.startswith(prefix + ".")
        if inside and (best < 0 or len(prefix) > len(LAYERS[best])):
            best = i
    assert best >= 0, module
    return best


def test_no_import_goes_up_a_layer() -> None:
    upward = [
        f"{src} ({LAYERS[layer_of(src)]}) imports {dst} ({LAYERS[layer_of(dst)]})"
        for src, dsts in _graph().items()
        for dst in dsts
        # a package __init__ may re-export from its own subpackages
        if layer_of(dst) > layer_of(src) and not dst.startswith(src + ".")
    ]
    assert not upward, "\n".join(sorted(upward))


def test_import_graph_has_no_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # a package re-exporting its own modules
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_a_planted_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The two checks above are only worth something if they can fail."""
    tree = ast.parse("from relaymesh.peer import Peer\n")
    node = tree.body[0]
    assert isinstance(node, ast.ImportFrom)
    assert layer_of(_resolve("coordinator.state", False, node)) > layer_of("coordinator.state")
    rel = ast.parse("from ..client import RelayClient\n").body[0]
    assert isinstance(rel, ast.ImportFrom)
    assert _resolve("relaymesh.bench.mesh", False, rel) == "relaymesh.client"
    assert _resolve("relay.protocol", True, ast.parse("from . import wire\n").body[0]) == (  # type: ignore[arg-type]
        "relay.protocol"
    )
