"""The module map holds: imports go downward (glue above core), and the core imports no Ray."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "orchestrator"

LAYERS = [
    {"spec", "catalog", "storage", "metrics"},                                # the job and the run folder
    {"runlock"},                                                              # one writer per run folder
    {"plan", "schedule", "search"},                                           # pure functions of the spec
    {"data", "weights", "models", "optim", "loop", "checkpoint", "progress", "eventlog"},  # torch, no Ray
    {"resolve", "fit", "lr_range"},                                           # the driver's plan, a worker's run, an LR probe
    {"runs", "trained", "evaluation", "export", "report", "pack"},            # after training: read back; packing data; no Ray
    {"session", "failure_policy", "worker", "launch", "sweep", "submit", "local_cluster", "ray_data"},  # Ray glue
    {"cli", "bench"},                                                         # entry points
]
CORE = set().union(*LAYERS[:4], LAYERS[5])
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported top-level name, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "orchestrator" and len(parts) > 1:
                found.append((parts[1], id(node) in top_level))
            elif parts[0] == "ray":
                found.append(("ray", id(node) in top_level))
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_has_a_layer():
    assert {_module(p) for p in FILES} == set(LAYER)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_level_imports_go_downward(path):
    here = _module(path)
    upward = [name for name, top in _imports(path) if top and name in LAYER and LAYER[name] > LAYER[here]]
    assert upward == [], f"{here} imports {upward} from a higher layer"


@pytest.mark.parametrize("path", [p for p in FILES if _module(p) in CORE], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_never_imports_ray_or_glue(path):
    """Not even inside a function: the loop, the model surgery and the schedule run without Ray."""
    bad = [name for name, _ in _imports(path) if name == "ray" or (name in LAYER and name not in CORE)]
    assert bad == []
