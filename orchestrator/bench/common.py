"""What every benchmark shares: running `orchestrator train` in a fresh process and reading back its
run folder, a warm cluster (`orchestrator up`) to measure against, and the figures' tables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from orchestrator.store.storage import METRICS_FILE, RunFolder


def figures_table(title: str, columns: tuple[str, ...]):
    """A rich table of figures: the first column (labels) left-aligned, the figures right-aligned."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    return table


FIRST_STEP_PATTERN = re.compile(r"first training step ([0-9.]+) s after the command started")


def run_train(job_path: Path, extra: list[str], env: dict | None = None) -> tuple[float, list[float]]:
    """(seconds to first step, train seconds per epoch) of `orchestrator train` in a fresh process."""
    command = [sys.executable, "-m", "orchestrator.cli", "train", str(job_path), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env={**(env or os.environ), "COLUMNS": "200"})
    match = FIRST_STEP_PATTERN.search(done.stdout)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    job = yaml.safe_load(job_path.read_text())
    rows = RunFolder(job["run"]["storage"], job["name"]).read_rows(METRICS_FILE)
    return float(match.group(1)), [r["train_s"] for r in rows]


@contextmanager
def warm_cluster(folder: Path) -> Iterator[tuple[str, dict]]:
    """`orchestrator up` in `folder` (its own cluster, whatever else runs here), `down` on the way out:
    yields (its GCS address, an environment in which `--address auto` means it and clients send the token)."""
    from orchestrator.cluster.local_cluster import read_info

    env = {**os.environ, "ORCHESTRATOR_CLUSTER_DIR": str(folder), "RAY_AUTH_MODE": "token"}
    up = subprocess.run([sys.executable, "-m", "orchestrator.cli", "up"], capture_output=True, text=True, env=env)
    try:
        if up.returncode != 0:
            raise RuntimeError(f"orchestrator up failed:\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}")
        yield read_info(folder).address, env
    finally:
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "down"], capture_output=True, env=env)


def timed_train(job_path: Path, env: dict) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(job_path)], capture_output=True, text=True, env=env)
    return done.returncode, time.perf_counter() - started
