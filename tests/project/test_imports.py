"""The house's import graph, read from the source (no import runs): no module of evods imports one of a room above
its own (model, data and parallel at the bottom; config and storage; checkpoint, monitor and inference; training;
cli on top), and no modules import each other in a cycle, even through imports inside functions."""
import ast

from testkit.paths import REPO

PACKAGE = REPO / "evods"
# room -> the rooms it may import from (besides itself). `progress` is evods/progress.py, the log lines of long work;
# `console` is evods/console.py, what a process prints by default and with --verbose.
ALLOWED = {
    "progress": set(),
    "console": set(),
    "model": set(),
    "data": {"console"},
    "parallel": {"model"},
    "storage": {"progress"},
    "config": {"model", "data", "parallel"},
    "checkpoint": {"model", "parallel", "config", "storage", "progress"},
    "monitor": {"model", "data", "parallel", "config"},
    "inference": {"model"},
    "training": {"model", "data", "parallel", "config", "storage", "checkpoint", "monitor", "progress", "console"},
    "cli": {"model", "data", "parallel", "config", "storage", "checkpoint", "monitor", "inference", "training",
            "progress", "console", "evods"},
    "evods": {"model"},  # evods/__init__.py registers the model with transformers
}


def module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path, modules: set[str]) -> set[str]:
    """The evods modules `path` imports anywhere in it; `from package import name` counts as the module
    package.name when there is one, else as the package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_room_imports_a_room_above_it_and_no_import_cycles():
    graph = import_graph()
    assert {room(module) for module in graph} == set(ALLOWED), "a new room: place it in ALLOWED"
    upward = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                    if room(target) != room(module) and room(target) not in ALLOWED[room(module)])
    assert upward == []
    assert cycles(graph) == []
    # the checker sees what it must: a known downward edge, and a cycle when there is one
    assert "evods.config" in graph["evods.checkpoint.layout"] and "evods.data.sampler" in graph["evods.data"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
