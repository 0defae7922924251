"""`orchestrator sweep`: ASHA over any job-file keys with Ray Tune, each trial a TorchTrainer run.

Ray 2.60's pattern: a Tune function trainable (`run_trial`, no CPU: it only drives) applies the
sampled values to the job, re-plans it (a swept batch size moves the scaled LR), and fits a
`TorchTrainer` whose `TuneReportCallback` hands every epoch's metrics to Tune; ASHA
(`AsyncHyperBandScheduler`, time unit: epochs, max_t = schedule.epochs) stops the weak trials.
Each trial's run folder is `<sweep folder>/trials/<trial_id>/`. The sweep folder gets
`results.parquet` (one row per trial) and `best.yaml` (a complete job file).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import yaml
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from orchestrator.search import SEARCH_SPACES
from orchestrator.spec import JobSpec, lookup, spec_to_yaml, validate_spec, with_values
from orchestrator.storage import METRICS_FILE, SPEC_FILE, SUMMARY_FILE, RunFolder

RESULTS_FILE = "results.parquet"
BEST_FILE = "best.yaml"
TRIALS_DIR = "trials"
TRIAL_DRIVER_MEMORY_BYTES = 256 * 2**20
TIME_ATTR = "epochs_done"   # reported with every epoch; unlike Tune's iteration count it survives resumes


class SweepInterrupted(Exception):
    """Ctrl-C during a sweep; the message says how to continue."""


def tune_space(space: dict[str, dict]) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, domain in space.items():
        (kind, args), = domain.items()
        out[key] = SEARCH_SPACES[kind](tune, args)
    return out


def trial_spec(base: dict, values: dict[str, Any], sweep_uri: str, trial_id: str) -> JobSpec:
    raw = with_values(base, values)
    raw["name"] = trial_id
    raw.setdefault("run", {})["storage"] = f"{sweep_uri}/{TRIALS_DIR}"
    return validate_spec(raw)


def run_trial(config: dict, base: dict, sweep_uri: str) -> None:
    """The Tune function trainable: one job, planned and fitted as a TorchTrainer reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.launch import build_trainer
    from orchestrator.resolve import resolve_plan

    trial_id = ray.tune.get_context().get_trial_id()
    spec = trial_spec(base, config, sweep_uri, trial_id)
    folder = RunFolder(spec.run.storage, spec.name)
    if _status(folder, spec.schedule.epochs, None) == "completed":
        # finished before an interruption that Tune's saved state missed: hand Tune the record, keep the run
        rows = folder.read_rows(METRICS_FILE)
        ray.tune.report({**rows[-1], TIME_ATTR: len(rows)})
        return
    plan = resolve_plan(spec, spec.scaling.num_workers).plan
    build_trainer(spec, plan, callbacks=[TuneReportCallback()]).fit()


def default_concurrency(spec: JobSpec) -> int:
    """Trials that fit the cluster at once, from its CPUs (or GPUs) and each trial's workers."""
    import ray

    total = ray.cluster_resources()
    if spec.scaling.use_gpu:
        return max(1, int(total.get("GPU", 0) // spec.scaling.num_workers))
    return max(1, int(total.get("CPU", 1) // (spec.scaling.num_workers * spec.scaling.cpus_per_worker)))


@dataclass
class TrialRow:
    trial_id: str
    values: dict[str, Any]
    epochs_run: int
    best: float | None
    status: str


def trial_rows(sweep: RunFolder, spec: JobSpec, statuses: dict[str, str] | None = None) -> list[TrialRow]:
    """One row per trial from the trial run folders (and Tune's final statuses when known)."""
    import pyarrow.fs as pafs

    metric, mode = spec.sweep.metric, spec.sweep.mode
    rows = []
    trials_root = sweep.path(TRIALS_DIR)
    if sweep.fs.get_file_info(trials_root).type == pafs.FileType.NotFound:
        return rows
    for info in sweep.fs.get_file_info(pafs.FileSelector(trials_root)):
        trial = RunFolder(sweep.uri + "/" + TRIALS_DIR, info.base_name)
        if not trial.exists(SPEC_FILE):
            continue
        trial_spec_dict = yaml.safe_load(trial.read_bytes(SPEC_FILE))
        values = {key: lookup(trial_spec_dict, key) for key in spec.sweep.space}
        metrics = trial.read_rows(METRICS_FILE) if trial.exists(METRICS_FILE) else []
        scores = [m[metric] for m in metrics if m.get(metric) is not None]
        best = (max(scores) if mode == "max" else min(scores)) if scores else None
        status = _status(trial, spec.schedule.epochs, (statuses or {}).get(info.base_name))
        rows.append(TrialRow(info.base_name, values, len(metrics), best, status))
    return sorted(rows, key=lambda r: (r.best is None, -(r.best or 0) if mode == "max" else (r.best or 0)))


def _status(trial: RunFolder, epochs: int, tune_status: str | None) -> str:
    """completed (its run folder says so) | error | stopped early (Tune ended it sooner) | running."""
    if trial.exists(SUMMARY_FILE):
        summary = trial.read_json(SUMMARY_FILE)
        if summary.get("status") == "completed" and summary.get("epochs_completed") == epochs:
            return "completed"
    if tune_status == "error":
        return "error"
    return "stopped early" if tune_status == "ended" else "running"


def leaderboard(rows: list[TrialRow], spec: JobSpec, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("trial")
    for key in spec.sweep.space:
        table.add_column(escape(key))
    table.add_column("epochs", justify="right")
    table.add_column(f"best {spec.sweep.metric}", justify="right")
    table.add_column("status")
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else escape(str(v)) for v in row.values.values()]
        table.add_row(row.trial_id, *cells, f"{row.epochs_run}/{spec.schedule.epochs}",
                      "-" if row.best is None else f"{row.best:.4f}", row.status)
    return table


def final_statuses(result_grid) -> dict[str, str]:
    """trial id -> 'error' or 'ended', from Tune's results (trial dirs are named by id)."""
    return {result.path.rstrip("/").rsplit("/", 1)[-1]: "error" if result.error else "ended" for result in result_grid}


def make_tuner(spec: JobSpec, sweep: RunFolder, resume: bool, console: Console):
    """The Tuner of this sweep: restored from `<sweep>/tune` when resuming, else new with ASHA."""
    import ray.tune
    from ray.tune.schedulers import AsyncHyperBandScheduler

    sweep_cfg = spec.sweep
    # A trial only drives its TorchTrainer: no CPU (the workers hold those), a little memory (Tune needs
    # a non-empty request).
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, base=spec.to_dict(), sweep_uri=sweep.uri),
                                        {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY_BYTES})
    tune_dir = f"{sweep.uri}/tune"
    if resume and ray.tune.Tuner.can_restore(tune_dir):
        console.print(f"resuming the sweep in {tune_dir}")
        return ray.tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                      param_space=tune_space(sweep_cfg.space))
    scheduler = AsyncHyperBandScheduler(time_attr=TIME_ATTR, max_t=spec.schedule.epochs,
                                        grace_period=sweep_cfg.asha.grace_period,
                                        reduction_factor=sweep_cfg.asha.reduction_factor)
    return ray.tune.Tuner(
        trainable, param_space=tune_space(sweep_cfg.space),
        tune_config=ray.tune.TuneConfig(metric=sweep_cfg.metric, mode=sweep_cfg.mode, scheduler=scheduler,
                                        num_samples=sweep_cfg.num_samples,
                                        max_concurrent_trials=sweep_cfg.max_concurrent_trials or default_concurrency(spec),
                                        trial_dirname_creator=lambda trial: trial.trial_id,
                                        trial_name_creator=lambda trial: trial.trial_id),
        run_config=ray.tune.RunConfig(name="tune", storage_path=sweep.uri, verbose=0),
    )


def run_sweep(spec: JobSpec, raw: dict, console: Console, resume: bool = False, verbose: bool = False) -> dict:
    """Run (or resume) the sweep; print the leaderboard; write results.parquet and best.yaml."""
    import os

    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # Tune's own reporter, silent at verbose=0
    sweep, sweep_cfg = RunFolder(spec.run.storage, spec.name), spec.sweep
    tuner = make_tuner(spec, sweep, resume, console)
    console.print(f"sweep {spec.name}: {sweep_cfg.num_samples} samples of {', '.join(sweep_cfg.space)}; ASHA over "
                  f"{spec.schedule.epochs} epochs (grace {sweep_cfg.asha.grace_period}, reduction {sweep_cfg.asha.reduction_factor:g}); "
                  f"{sweep_cfg.max_concurrent_trials or default_concurrency(spec)} trial(s) at once, "
                  f"{spec.scaling.num_workers} worker(s) each")
    outcome: dict = {}
    done = threading.Event()

    def run_tuner() -> None:
        try:
            outcome["grid"] = tuner.fit()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run_tuner, name="tuner", daemon=True).start()
    try:
        with Live(leaderboard([], spec, "leaderboard"), console=console, refresh_per_second=1, transient=True) as live:
            while not done.wait(timeout=2.0):
                live.update(leaderboard(trial_rows(sweep, spec), spec, f"leaderboard ({time.strftime('%H:%M:%S')})"))
    except KeyboardInterrupt:
        from orchestrator.session import stop_ray

        stop_ray(console)
        raise SweepInterrupted(f"interrupted: trials stopped; finished trials and checkpoints are kept in {sweep.uri}; "
                               "continue with: orchestrator sweep JOB --resume") from None
    if "error" in outcome:
        raise outcome["error"]
    rows = trial_rows(sweep, spec, final_statuses(outcome["grid"]))
    return finish_sweep(spec, raw, sweep, rows, console)


def finish_sweep(spec: JobSpec, raw: dict, sweep: RunFolder, rows: list[TrialRow], console: Console) -> dict:
    """results.parquet, best.yaml, the final table and the ASHA saving."""
    console.print(leaderboard(rows, spec, f"sweep {spec.name}: every trial"))
    sweep.write_rows(RESULTS_FILE, [
        {"trial_id": r.trial_id, **{k: _cell(v) for k, v in r.values.items()}, "epochs_run": r.epochs_run,
         f"best_{spec.sweep.metric}": r.best, "status": r.status} for r in rows])
    scored = [r for r in rows if r.best is not None]
    if not scored:
        raise RuntimeError(f"no trial reported {spec.sweep.metric}; see the trial folders in {sweep.uri}/{TRIALS_DIR}")
    best = scored[0]
    best_raw = with_values(raw, best.values)
    best_raw["name"] = f"{spec.name}_best"
    best_job = spec_to_yaml(validate_spec(best_raw))
    sweep.write_text(BEST_FILE, f"# best of sweep {spec.name}: trial {best.trial_id}, {spec.sweep.metric} {best.best:.4f}\n{best_job}")
    used = sum(r.epochs_run for r in rows)
    full = len(rows) * spec.schedule.epochs
    console.print(f"best: trial {best.trial_id} ({', '.join(f'{k}={_cell(v)}' for k, v in best.values.items())}), "
                  f"{spec.sweep.metric} {best.best:.4f}")
    console.print(f"ASHA used {used} epochs of the {full} these {len(rows)} trials would use at full budget "
                  f"({used / full:.0%}; saved {full - used})")
    console.print(f"wrote {sweep.uri}/{RESULTS_FILE} and {sweep.uri}/{BEST_FILE}; train the best with: "
                  f"orchestrator train {sweep.uri}/{BEST_FILE}")
    return {"best_trial": best.trial_id, "best": best.best, "epochs_used": used, "epochs_full": full, "trials": len(rows)}


def _cell(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
