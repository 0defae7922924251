"""`python -m orchestrator.cli` (how a submitted job runs on the cluster).

First, without importing any of them, checks that this Python has the packages orchestrator needs: a
cluster's Python that lacks them fails here, in its first second, with one line that says what to do,
instead of a ModuleNotFoundError deep in a traceback.
"""

import importlib.util
import sys

NEEDED = ("rich", "pydantic", "yaml", "pyarrow", "safetensors", "numpy", "torch", "torchvision", "ray")
"""top-level modules of orchestrator's dependencies (pyproject.toml), named as they are imported"""


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def missing_line(missing: list[str]) -> str:
    return (f"error: this Python ({sys.executable}) lacks {', '.join(missing)}, which orchestrator needs. Install "
            "orchestrator where the job runs: in the cluster's image (cluster/Dockerfile), with the runtime env's "
            "pip, or, for `orchestrator up`, start the cluster from the environment orchestrator is installed in")


if __name__ == "__main__":
    absent = missing_modules()
    if absent:
        print(missing_line(absent), file=sys.stderr)
        sys.exit(2)
    from orchestrator.cli.app import main

    sys.exit(main())
