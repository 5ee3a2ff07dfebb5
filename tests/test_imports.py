"""The package's import graph: no cycles, and the file writers (qwen_edit.testing) kept out of the runtime."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwen_edit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, imports inside functions included: a lazy import
    hides a cycle from Python, not from a reader."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from . import x` imports the submodule x where there is one, else a name of the package
                submodules = [f"{module}.{alias.name}" for alias in node.names]
                found = [m for m in submodules if m in files]
                deps.update(found or ([module] if module in files else []))
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name in files)
        deps.discard(name)
        graph[name] = deps
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert "qwen_edit.offload" in graph["qwen_edit.transformer"]  # the graph sees what it should
    cycles = []
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_only_the_demo_reaches_the_file_writers():
    """qwen_edit.testing writes model files; of the runtime, only QwenEditPipeline.demo() uses it."""
    users = {
        name
        for name, deps in import_graph().items()
        if not name.startswith("qwen_edit.testing") and any(d.startswith("qwen_edit.testing") for d in deps)
    }
    assert users == {"qwen_edit.pipeline"}
