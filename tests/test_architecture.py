"""The layout's promises: the library runs a round without Flower, and no module imports itself
back through others (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import PROJECT

PACKAGES = ("fedllm", "server", "client")


def module_name(path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, object]:
    return {module_name(p): p for package in PACKAGES for p in sorted((PROJECT / package).rglob("*.py"))}


def runtime_imports(name: str, path, known: set[str]) -> set[str]:
    """The project modules `name` imports when it runs: every import statement (also inside
    functions), except those under `if TYPE_CHECKING:` and those of its own ancestor packages
    (already being initialised when it runs: `from . import sibling` is not a cycle)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for guard in ast.walk(tree) if isinstance(guard, ast.If)
               and getattr(guard.test, "id", getattr(guard.test, "attr", "")) == "TYPE_CHECKING"
               for stmt in guard.body for node in ast.walk(stmt)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
            found.add(source)
            found |= {f"{source}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name and not name.startswith(f"{m}.")}


def test_no_module_of_the_package_imports_itself_back():
    known = modules()
    graph = {name: runtime_imports(name, path, set(known)) for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return [*path, module, imported]
            if imported not in state and (found := cycle_from(imported, [*path, module])):
                return found
        state[module] = 2
        return None

    for module in sorted(graph):
        assert module in state or (cycle := cycle_from(module, [])) is None, " -> ".join(cycle)
    assert graph["fedllm.config"] >= {"fedllm.methods.settings", "fedllm.privacy.settings"}, "the checker sees imports"


def test_the_library_runs_its_rounds_without_flower():
    """Every fedllm module imports without loading flwr (the command-line tooling loads it lazily)."""
    library = sorted(name for name in modules() if name.split(".")[0] == "fedllm")
    code = (f"import importlib, sys\nfor m in {library!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"flwr modules loaded: {result.stdout[:500]}"
    assert "fedllm.core.aggregator" in library and "fedllm.core.local" in library


def test_the_clientapp_a_node_starts_per_message_loads_no_model_library():
    """`client.app` stays light: torch, transformers and peft load only where a message is handled,
    so a node whose worker handles its messages does not pay for them per message."""
    code = ("import sys, client.app\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"loaded by client.app: {result.stdout}"
