"""The package's layering: no module imports one of a higher layer, and no import circle.

Every `import megamod...` statement of every module counts, at the top or inside a
function (a deferred import is still a dependency); `TYPE_CHECKING` imports too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import megamod

ROOT = Path(megamod.__file__).parent

# Top to bottom; a module may import its own layer's modules and any lower layer's.
LAYERS = [
    ["__main__", "cli"],
    ["eval"],
    ["inference"],
    ["training"],
    ["parallel", "convert"],
    ["models"],
    ["precision", "data", "mod", "moe"],
    ["micro_batch"],
    ["config"],
    ["errors", "cpu_compat", "process_hygiene"],
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == "megamod")
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # `from megamod.data import formats` names a module; `from megamod.x import f` a function.
        graph[name] = {n if n in modules else n.rpartition(".")[0] for n in _imports(path)}
        graph[name] = {n for n in graph[name] if n in modules and n not in (name, "megamod")}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return RANK[parts[1]] if len(parts) > 1 else RANK["__main__"]


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in _graph() if len(m.split(".")) > 1 and m.split(".")[1] not in RANK)
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_no_import_runs_up_a_layer():
    upward = sorted(
        f"{a} imports {b}" for a, targets in _graph().items() for b in targets
        if len(b.split(".")) > 1 and _layer(b) < _layer(a)
    )
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with both faults trips them."""
    pkg = tmp_path / "megamod"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("from megamod.models.llava import LLaVA\n")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "llava.py").write_text("def f():\n    from megamod import config\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    graph = _graph()
    assert graph["megamod.config"] == {"megamod.models.llava"}
    assert graph["megamod.models.llava"] == {"megamod.config"}
    assert _layer("megamod.models.llava") < _layer("megamod.config")
    with pytest.raises(AssertionError, match="megamod.config imports megamod.models.llava"):
        test_no_import_runs_up_a_layer()
    with pytest.raises(AssertionError, match="->"):
        test_no_import_circle()
