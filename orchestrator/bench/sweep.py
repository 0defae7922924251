"""`orchestrator bench sweep`: the same 16 configurations under ASHA and at full budget.

Prints the epochs and wall time ASHA used as ratios of the full grid's, and the gap between the
two bests (in points of val_acc1), all measured in one run. ASHA: grace period 1 epoch, reduction
factor 4 (rungs at 1 and 4 of 9 epochs), two trials at once, each trial one worker (the loop runs in
its Tune actor, which later trials reuse).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from orchestrator.store.storage import SWEEP_RESULTS_FILE, RunFolder

REDUCTION_FACTOR = 4


def sweep_bench_job(storage: str, name: str, epochs: int, grace_period: int, max_per_class: int = 40) -> dict:
    """16 fixed configurations (4 LRs x 4 schedules) of a few-shot digits run, 1 worker each."""
    return {
        "name": name, "seed": 0,
        "data": {"source": "builtin:digits", "classes": [0, 1, 2, 3, 4], "max_per_class": max_per_class, "image_size": 16},
        "model": {"arch": "resnet18"},
        "optim": {"name": "sgd", "base_lr": 0.1, "base_batch_size": 256},
        "schedule": {"name": "cosine", "epochs": epochs, "warmup_epochs": 1, "step_size": 3, "gamma": 0.5, "patience": 1},
        "scaling": {"num_workers": 1, "per_worker_batch_size": 32},
        "run": {"storage": storage, "max_failures": 0},
        "sweep": {"metric": "val_acc1", "mode": "max", "num_samples": 1,
                  "asha": {"grace_period": grace_period, "reduction_factor": REDUCTION_FACTOR},
                  "space": {"optim.base_lr": {"grid": [0.001, 0.01, 0.1, 1.0]},
                            "schedule.name": {"grid": ["cosine", "step", "exponential", "plateau"]}}},
    }


def sweep_bench(console: Console, epochs: int = 9, max_per_class: int = 80) -> dict:
    """The same 16 configurations with ASHA (grace 1, reduction 4) and at full budget (no stopping)."""
    figures = {}
    with tempfile.TemporaryDirectory() as workdir:
        storage = str(Path(workdir) / "runs")
        for label, grace in (("asha", 1), ("full", epochs)):
            path = Path(workdir) / f"{label}.yaml"
            path.write_text(yaml.safe_dump(sweep_bench_job(storage, label, epochs, grace, max_per_class)))
            console.print(f"sweep of 16 configurations, {'ASHA' if grace == 1 else 'full budget'} ...")
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(path)], capture_output=True, text=True,
                                  env={**os.environ, "COLUMNS": "200"})
            if done.returncode != 0:
                raise RuntimeError(f"the {label} sweep failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            rows = RunFolder(storage, label).read_rows(SWEEP_RESULTS_FILE)
            figures[label] = {"epochs": sum(r["epochs_run"] for r in rows), "best": max(r["best_val_acc1"] for r in rows),
                              "trials": len(rows), "seconds": time.perf_counter() - started}
    table = Table(title="ASHA vs full budget, the same 16 configurations", title_justify="left")
    for column in ("", "epochs used", "best val_acc1", "wall s"):
        table.add_column(column, justify="left" if not column else "right")
    for label in ("full", "asha"):
        f = figures[label]
        table.add_row("full budget" if label == "full" else "ASHA", str(f["epochs"]), f"{f['best']:.4f}", f"{f['seconds']:.0f}")
    ratio = figures["asha"]["epochs"] / figures["full"]["epochs"]
    gap = 100 * (figures["full"]["best"] - figures["asha"]["best"])
    table.add_row("ASHA / full", f"{ratio:.2f}", f"{-gap:+.2f} points", f"{figures['asha']['seconds'] / figures['full']['seconds']:.2f}")
    console.print(table)
    console.print("goals: ASHA uses at most a third of the epochs and 0.4 of the wall time, its best within 0.5 points "
                  "of the full-budget best")
    figures.update(epochs_ratio=ratio, wall_ratio=figures["asha"]["seconds"] / figures["full"]["seconds"], best_gap_points=gap)
    return figures
