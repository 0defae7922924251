"""`orchestrator bench search`: random search + ASHA against TPE + ASHA on one measured LR x weight-decay
landscape, over several sweep seeds.

1. The landscape: a real `orchestrator sweep` (search grid, nothing stopped) of a few-shot digits job over
   `LRS` x `WEIGHT_DECAYS`; each configuration's val_acc1 after every epoch comes from its metrics.parquet.
   The target is the grid's best minus `TARGET_POINTS`.
2. The searches, replayed on that landscape (so each seed costs no training, and both methods meet the same
   noise): up to `max_trials` trials one after another over the continuous space (optim.base_lr loguniform
   over the grid's range, optim.weight_decay a choice of the grid's values); a trial's curve is that of the
   grid LR nearest in log. ASHA (Ray Tune's own bracket, grace 1 epoch, reduction 3, as `sweep` runs it)
   stops trials at its rungs; `suggest.draw_random` or `suggest.suggest_tpe` (told every trial before, as
   `sweep` tells it) picks the next. Counted: epochs spent until a trial reaches the target.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import yaml
from rich.console import Console
from rich.table import Table

from orchestrator.cluster.suggest import Finished, draw_random, suggest_tpe
from orchestrator.store.runs import trial_folder
from orchestrator.store.storage import METRICS_FILE, SWEEP_STATE_FILE, RunFolder

LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)
TARGET_POINTS = 0.5
"""a trial counts as found once its val_acc1 is within this many points of the grid's best"""
STARTUP_TRIALS = 4
"""TPE's random trials first: sweep.startup_trials' default"""
SPACE = {"optim.base_lr": {"loguniform": [LRS[0], LRS[-1]]}, "optim.weight_decay": {"choice": list(WEIGHT_DECAYS)}}


def landscape_job(storage: str, epochs: int) -> dict:
    """The grid sweep that measures the landscape: the 10 digit classes (1,797 images, 1,437 to train on), 16 px;
    resnet18, SGD, cosine (few epochs: the grid's best is below 100%, and LR and decay matter)."""
    return {
        "name": "landscape", "seed": 0,
        "data": {"source": "builtin:digits", "image_size": 16},
        "model": {"arch": "resnet18"},
        "optim": {"name": "sgd", "base_lr": 0.1, "base_batch_size": 32},
        "schedule": {"name": "cosine", "epochs": epochs, "warmup_epochs": 0},
        "scaling": {"num_workers": 1, "per_worker_batch_size": 32},
        "run": {"storage": storage, "max_failures": 0},
        "sweep": {"search": "grid", "asha": {"grace_period": epochs}, "max_concurrent_trials": 2,
                  "space": {"optim.base_lr": {"grid": list(LRS)}, "optim.weight_decay": {"grid": list(WEIGHT_DECAYS)}}},
    }


def measure_landscape(console: Console, epochs: int) -> dict[tuple[float, float], list[float]]:
    """(lr, weight decay) -> val_acc1 after each epoch, from a real grid sweep."""
    with tempfile.TemporaryDirectory() as workdir:
        storage = str(Path(workdir) / "runs")
        path = Path(workdir) / "landscape.yaml"
        path.write_text(yaml.safe_dump(landscape_job(storage, epochs)))
        console.print(f"measuring the landscape: a grid sweep of {len(LRS) * len(WEIGHT_DECAYS)} configurations x {epochs} epochs ...")
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(path)], capture_output=True,
                              text=True, env={**os.environ, "COLUMNS": "200"})
        if done.returncode != 0:
            raise RuntimeError(f"the landscape sweep failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        sweep = RunFolder(storage, "landscape")
        out = {}
        for trial in sweep.read_json(SWEEP_STATE_FILE)["trials"]:
            rows = trial_folder(sweep, trial["id"]).read_rows(METRICS_FILE)
            out[(trial["values"]["optim.base_lr"], trial["values"]["optim.weight_decay"])] = [r["val_acc1"] for r in rows]
        return out


def nearest_cell(values: dict) -> tuple[float, float]:
    lr = min(LRS, key=lambda grid_lr: abs(math.log(grid_lr) - math.log(values["optim.base_lr"])))
    return lr, values["optim.weight_decay"]


def replay(method: str, landscape: dict, seed: int, epochs: int, max_trials: int, target: float) -> tuple[int, bool]:
    """(epochs spent, reached): one sequential sweep with ASHA until a trial reaches `target`."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    bracket = AsyncHyperBandScheduler(time_attr="epochs", metric="val_acc1", mode="max", max_t=epochs,
                                      grace_period=1, reduction_factor=3)._brackets[0]
    drawn = draw_random(SPACE, seed, 0, max_trials) if method == "random" else None
    history: list[Finished] = []
    spent = 0
    for number in range(max_trials):
        values = drawn[number] if drawn else suggest_tpe(SPACE, seed, number, STARTUP_TRIALS, "max", history)
        curve, scores = landscape[nearest_cell(values)], []
        for epoch, score in enumerate(curve, start=1):
            spent += 1
            scores.append(score)
            if score >= target:
                return spent, True
            if bracket.on_result(SimpleNamespace(trial_id=f"trial_{number}"), epoch, score) == TrialScheduler.STOP:
                break
        history.append(Finished(values, scores, "completed" if len(scores) == len(curve) else "stopped"))
    return spent, False


def load_or_measure(console: Console, epochs: int, path: Path | None) -> dict[tuple[float, float], list[float]]:
    """The landscape from `path` (JSON written by an earlier run of the same epochs), else measured (and
    written to `path` when given)."""
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved["epochs"] == epochs and saved["lrs"] == list(LRS) and saved["weight_decays"] == list(WEIGHT_DECAYS):
            console.print(f"the landscape from {path}")
            return {(cell["lr"], cell["weight_decay"]): cell["val_acc1"] for cell in saved["cells"]}
        console.print(f"{path} is of other settings: measuring again")
    landscape = measure_landscape(console, epochs)
    if path is not None:
        path.write_text(json.dumps({"epochs": epochs, "lrs": list(LRS), "weight_decays": list(WEIGHT_DECAYS),
                                    "cells": [{"lr": lr, "weight_decay": wd, "val_acc1": curve}
                                              for (lr, wd), curve in landscape.items()]}, indent=1))
    return landscape


def search_bench(console: Console, epochs: int = 5, seeds: int = 10, max_trials: int = 40,
                 landscape_path: Path | None = None) -> dict:
    """The landscape, then each method over `seeds` sweep seeds; the figures (means over seeds)."""
    landscape = load_or_measure(console, epochs, landscape_path)
    grid_best = max(max(curve) for curve in landscape.values())
    target = grid_best - TARGET_POINTS / 100
    figures: dict = {"grid_best": grid_best, "target": target, "seeds": seeds, "grid_epochs": len(landscape) * epochs}
    for method in ("random", "tpe"):
        runs = [replay(method, landscape, seed, epochs, max_trials, target) for seed in range(seeds)]
        figures[method] = {"epochs_to_target": statistics.mean(spent for spent, _ in runs),
                           "reached": sum(reached for _, reached in runs), "per_seed": [spent for spent, _ in runs]}
    print_search(console, figures, max_trials)
    return figures


def print_search(console: Console, figures: dict, max_trials: int) -> None:
    table = Table(title=f"epochs until a trial is within {TARGET_POINTS} points of the grid's best "
                        f"({figures['grid_best']:.4f}; the full grid took {figures['grid_epochs']} epochs)",
                  title_justify="left")
    for column in ("search", "mean epochs", "reached", "per seed"):
        table.add_column(column, justify="left" if column in ("search", "per seed") else "right")
    for method, label in (("random", "random + ASHA"), ("tpe", "TPE + ASHA")):
        f = figures[method]
        table.add_row(label, f"{f['epochs_to_target']:.1f}", f"{f['reached']}/{figures['seeds']}",
                      " ".join(map(str, f["per_seed"])))
    console.print(table)
    ratio = figures["tpe"]["epochs_to_target"] / figures["random"]["epochs_to_target"]
    console.print(f"TPE / random: {ratio:.2f} of the epochs (a seed that never reached the target within "
                  f"{max_trials} trials counts the epochs it spent)")
