"""The package's shape: no import cycle (lazy and TYPE_CHECKING imports included), no oversized module, light
entry points, and registries that take a new method, metric or backend from outside the package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from harness.registry import Registry, UnknownNameError
from tests.conftest import REPO

PACKAGE = REPO / "harness"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every harness module `path` imports anywhere in its body (top level, functions, TYPE_CHECKING blocks).

    `from a.b import c` counts as importing a.b, and a.b.c too when that is a module. Importing a.b.c also runs the
    package a.b's __init__, which counts unless the importer lies inside that package (then it is already running).
    """
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target not in known:
                continue
            found.add(target)
            parent = target.rpartition(".")[0]
            while parent and parent in known and not name.startswith(parent + ".") and parent != name:
                found.add(parent)
                parent = parent.rpartition(".")[0]
    found.discard(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    known = modules()
    graph = {name: imported_modules(path, set(known)) for name, path in known.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_the_size_limit_without_a_reason():
    too_long = [f"{name} ({n} lines)" for name, path in modules().items()
                if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
                and "Longer than" not in path.read_text(encoding="utf-8")[:2000]]
    assert not too_long, f"split these or say at their top why they are long: {too_long}"


def test_protocol_loading_and_the_dry_run_import_no_torch():
    code = ("import sys; from run_experiment import main; main(['protocols/smoke.yaml', '--dry-run']); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'bitsandbytes') "
            "if m in sys.modules]; print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out[-500:]


# --------------------------------------------------------------------------------------------------------------
# The registry


def test_registry_lazy_entries_load_on_first_use_and_unknown_names_are_explained():
    registry: Registry[object] = Registry("widget", lazy={"path": "pathlib:Path"})
    assert "path" in registry and registry.names() == ["path"]
    registry.register("number", 7)
    assert registry.get("path") is Path and registry.get("number") == 7
    with pytest.raises(UnknownNameError) as caught:
        registry.get("nubmer")
    assert str(caught.value) == "unknown widget 'nubmer'; did you mean 'number'? registered: path, number."
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("path", 1)
    registry.unregister("number")
    assert registry.names() == ["path"]
