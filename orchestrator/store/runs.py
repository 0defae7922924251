"""What the run folders under a storage say: `orchestrator runs`, and the status every later command reads.

A run's status: `running` while a live process holds its `run.lock`; otherwise what its
summary.json says (`completed`, `diverged`, `failed`, `interrupted`); a run with no summary and
no live lock died without a word (killed): `interrupted` (a re-run resumes it). The driver records
`failed` and `interrupted` with `record_stop`, only when its attempt had started (it wrote
spec.yaml): a run refused at its checks leaves the folder as it was. A sweep (a folder with
sweep.json) is `running`, `completed` (results.parquet written and every trial ended) or
`interrupted`. Reads JSON, YAML and Parquet only. Imports no torch, no Ray.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs
import yaml

from orchestrator.config.errors import UserError
from orchestrator.store.metrics import improved
from orchestrator.store.runlock import live_holder
from orchestrator.store.storage import (LOCK_FILE, METRICS_FILE, SPEC_FILE, SUMMARY_FILE, SWEEP_RESULTS_FILE,
                                        SWEEP_STATE_FILE, RunFolder, StorageError, absolute_storage, trials_storage)


class RunsError(UserError):
    """A storage folder that does not exist or cannot be listed (exit 2)."""


@dataclass
class RunInfo:
    name: str
    kind: str
    """run | sweep"""
    status: str
    epochs_completed: int
    epochs: int | None
    best_val_acc1: float | None
    test_acc1: float | None
    wall_s: float | None
    updated_at: str | None
    """ISO 8601 (UTC) time of the newest file at the folder's top level"""
    path: str
    trials: int | None = None
    best_trial: str | None = None
    best_metric: str | None = None
    best: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _updated_at(folder: RunFolder) -> str | None:
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.root, recursive=False))
    times = [i.mtime for i in infos if i.type == pafs.FileType.File and i.mtime is not None]
    if not times:
        return None
    newest = max(times)
    newest = newest if newest.tzinfo else newest.replace(tzinfo=dt.timezone.utc)
    return newest.astimezone(dt.timezone.utc).isoformat(timespec="seconds")


def _spec_dict(folder: RunFolder) -> dict:
    try:
        return yaml.safe_load(folder.read_bytes(SPEC_FILE)) or {}
    except (OSError, yaml.YAMLError):
        return {}


def run_status(folder: RunFolder, summary: dict | None) -> str:
    if live_holder(folder) is not None:
        return "running"
    return summary.get("status", "interrupted") if summary else "interrupted"


def read_summary(folder: RunFolder) -> dict | None:
    try:
        return folder.read_json(SUMMARY_FILE) if folder.exists(SUMMARY_FILE) else None
    except ValueError:
        return None


def read_metrics(folder: RunFolder) -> list[dict]:
    try:
        return folder.read_rows(METRICS_FILE) if folder.exists(METRICS_FILE) else []
    except (OSError, ValueError):
        return []


def run_info(folder: RunFolder) -> RunInfo:
    """One run folder's row (from summary.json when written, else from metrics.parquet and spec.yaml)."""
    summary = read_summary(folder)
    rows = read_metrics(folder)
    spec = _spec_dict(folder)
    epochs = (summary or {}).get("epochs") or (spec.get("schedule") or {}).get("epochs")
    scored = [r["val_acc1"] for r in rows if r.get("val_acc1") is not None]
    best_val = (summary or {}).get("best_val_acc1", max(scored) if scored else None)
    return RunInfo(folder.name, "run", run_status(folder, summary), len(rows), epochs, best_val,
                   (summary or {}).get("test_acc1"), rows[-1]["wall_s"] if rows else (summary or {}).get("wall_s"),
                   _updated_at(folder), folder.uri)


def sweep_info(folder: RunFolder) -> RunInfo:
    """A sweep folder's row: its trial count and best trial (from the trials' own metrics)."""
    trials = folder.read_json(SWEEP_STATE_FILE).get("trials", [])
    metric, mode, epochs = sweep_settings(folder, trials)
    rows = trial_rows(folder, trials, metric, mode, epochs)
    best = rows[0] if rows and rows[0].best is not None else None
    if live_holder(folder) is not None:
        status = "running"
    elif folder.exists(SWEEP_RESULTS_FILE) and all(t.get("status") == "ended" for t in trials):
        status = "completed"
    else:
        status = "interrupted"
    return RunInfo(folder.name, "sweep", status, sum(r.epochs_run for r in rows), epochs,
                   best.best if best and metric == "val_acc1" else None, None, None, _updated_at(folder), folder.uri,
                   trials=len(trials), best_trial=best.trial_id if best else None, best_metric=metric,
                   best=best.best if best else None)


def trial_folder(sweep: RunFolder, trial_id: str) -> RunFolder:
    return RunFolder(trials_storage(sweep.uri), trial_id)


def sweep_settings(sweep: RunFolder, trials: list[dict]) -> tuple[str, str, int | None]:
    """(metric, mode, epochs per trial) of a sweep, from a trial's spec.yaml (the job's sweep and schedule
    keys); val_acc1, max and None before any trial started."""
    for trial in trials:
        spec = _spec_dict(trial_folder(sweep, trial["id"]))
        if spec:
            keys = spec.get("sweep") or {}
            return keys.get("metric", "val_acc1"), keys.get("mode", "max"), (spec.get("schedule") or {}).get("epochs")
    return "val_acc1", "max", None


@dataclass
class TrialRow:
    trial_id: str
    values: dict
    epochs_run: int
    best: float | None
    status: str


def best_of(rows: list[dict], metric: str, mode: str) -> float | None:
    """The best value of `metric` over the epoch rows (max or min by `mode`), None when none has it."""
    scores = [row[metric] for row in rows if row.get(metric) is not None]
    return (max(scores) if mode == "max" else min(scores)) if scores else None


def trial_rows(sweep: RunFolder, trials: list[dict], metric: str, mode: str, epochs: int | None) -> list[TrialRow]:
    """One row per trial of the sweep's record (sweep.json's trials), best first, from its run folder's metrics."""
    rows = []
    for trial in trials:
        folder = trial_folder(sweep, trial["id"])
        metrics = read_metrics(folder)
        best = best_of(metrics, metric, mode)
        status = trial_status(folder, epochs, trial.get("status"), len(metrics))
        rows.append(TrialRow(trial["id"], trial["values"], len(metrics), best, status))
    return sorted(rows, key=lambda r: (r.best is None, -(r.best or 0) if mode == "max" else (r.best or 0)))


def trial_status(trial: RunFolder, epochs: int | None, recorded: str | None, epochs_run: int | None = None) -> str:
    """completed | error | stopped early (ended sooner) | running | pending.

    A trial that trained every epoch is completed even when Tune ended it (ASHA stops a trial that
    reaches max_t) before its test evaluation wrote summary.json.
    """
    if epochs_run is None:
        epochs_run = len(read_metrics(trial))
    if epochs is not None and epochs_run >= epochs:
        return "completed"
    if recorded == "error":
        return "error"
    if recorded == "ended":
        return "stopped early"
    return "running" if epochs_run else "pending"


def folder_kind(folder: RunFolder) -> str | None:
    """run | sweep | None (neither)."""
    if folder.exists(SWEEP_STATE_FILE):
        return "sweep"
    if folder.exists(SPEC_FILE) or folder.exists(SUMMARY_FILE) or folder.exists(LOCK_FILE):
        return "run"
    return None


def list_runs(storage: str) -> list[RunInfo]:
    """Every run and sweep folder directly under `storage` (a path or URI), newest update first."""
    base = RunFolder(storage, "")
    root = absolute_storage(storage)
    try:
        info = base.fs.get_file_info(base.root.rstrip("/"))
        if info.type != pafs.FileType.Directory:
            raise RunsError(f"no such storage folder: {root}")
        entries = base.fs.get_file_info(pafs.FileSelector(base.root.rstrip("/"), recursive=False))
    except OSError as exc:
        raise RunsError(f"cannot list {root}: {exc}") from None
    found = []
    for entry in entries:
        if entry.type != pafs.FileType.Directory:
            continue
        folder = RunFolder(storage, entry.base_name)
        kind = folder_kind(folder)
        if kind == "run":
            found.append(run_info(folder))
        elif kind == "sweep":
            found.append(sweep_info(folder))
    return sorted(found, key=lambda r: r.updated_at or "", reverse=True)


def spec_written_at(folder: RunFolder):
    """The modification time of the run's spec.yaml, or None (what `record_stop` compares)."""
    try:
        return folder.fs.get_file_info(folder.path(SPEC_FILE)).mtime
    except OSError:
        return None


def record_stop(folder: RunFolder, status: str, message: str, spec_before) -> bool:
    """Write summary.json saying the run stopped (`failed` or `interrupted`) and why, if this attempt
    had started (its spec.yaml was written after `spec_before` was read); returns whether it wrote."""
    written = spec_written_at(folder)
    if written is None or written == spec_before:
        return False
    try:
        _write_stop(folder, status, message)
    except StorageError:   # the storage that failed the run may fail this too: the original error matters more
        return False
    return True


def _write_stop(folder: RunFolder, status: str, message: str) -> None:
    rows = read_metrics(folder)
    spec = _spec_dict(folder)
    best = None
    for row in rows:   # the best epoch as training chooses it (metrics.improved: acc@1, then lower loss)
        if row.get("val_acc1") is not None and improved(best, row):
            best = row
    folder.write_json(SUMMARY_FILE, {
        "name": folder.name, "status": status, "message": message, "epochs_completed": len(rows),
        "epochs": (spec.get("schedule") or {}).get("epochs"), "wall_s": rows[-1]["wall_s"] if rows else None,
        "best_epoch": best["epoch"] if best else None, "best_val_acc1": best["val_acc1"] if best else None,
        "test_acc1": None, "test_acc5": None, "test_loss": None, "test_images": 0, "run_folder": folder.uri})
