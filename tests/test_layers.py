"""The module map holds: every import, at module level or inside a function, points down the layers of
packages; the files' import graph has no cycle; the core imports no Ray, the config no torch; no module
of ours is imported by a string; modules and functions stay small."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "orchestrator"

LAYERS = ["config", "store", "data", "train", "after", "cluster", "bench", "cli"]
"""lowest first: a file may import its own package and the ones before it"""
LAYER = {name: i for i, name in enumerate(LAYERS)}
CORE = {"config", "store", "data", "train", "after"}
"""no Ray, not even inside a function: the loop, the model surgery and the schedule run without it"""
TORCH_FREE = {"config", "store"}
"""reading and checking a job file, and listing runs, import no torch"""

FILES = sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in FILES}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imports(path: Path) -> list[str]:
    """Every module a file imports (at module level, in functions, under TYPE_CHECKING), absolute names."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.append(child if child in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


GRAPH = {name: sorted({m for m in _imports(path) if m in MODULES and m != name}) for name, path in MODULES.items()}


def test_every_file_is_in_a_layer():
    assert {_package(name) for name in MODULES} - {None} == set(LAYERS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_import_points_down(name):
    here = LAYER.get(_package(name), -1)
    upward = [m for m in GRAPH[name] if LAYER.get(_package(m), -1) > here]
    assert upward == [], f"{name} imports {upward} from a higher layer"


@pytest.mark.parametrize("name", [n for n in sorted(MODULES) if _package(n) in CORE])
def test_core_never_imports_ray(name):
    assert [m for m in _imports(MODULES[name]) if m.split(".")[0] == "ray"] == []


@pytest.mark.parametrize("name", [n for n in sorted(MODULES) if _package(n) in TORCH_FREE])
def test_config_and_store_import_no_torch(name):
    assert [m for m in _imports(MODULES[name]) if m.split(".")[0] in ("torch", "torchvision")] == []


def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (or a module importing itself)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_anywhere():
    assert _strongly_connected(GRAPH) == []


def test_the_cycle_check_finds_a_cycle():
    assert _strongly_connected({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


def test_no_module_of_ours_is_imported_by_a_string():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__"):
                assert False, f"{name} imports a module by a string: {ast.unparse(node)}"


MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 400, 50, 8


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
            count = len(names) - (names[:1] in (["self"], ["cls"])) + bool(args.vararg) + bool(args.kwarg)
            yield node.name, node.end_lineno - node.lineno + 1, count


@pytest.mark.parametrize("name", sorted(MODULES))
def test_small_modules_and_functions(name):
    path = MODULES[name]
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES
    too_big = [(fn, lines, params) for fn, lines, params in _functions(path)
               if lines > MAX_FUNCTION_LINES or params > MAX_PARAMETERS]
    assert too_big == []
