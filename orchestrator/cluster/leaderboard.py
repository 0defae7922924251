"""A sweep's results: the leaderboard on screen, results.parquet, best.yaml and what ASHA saved."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.config.jobfile import spec_to_yaml, validate_spec
from orchestrator.config.keys import with_values
from orchestrator.config.spec import JobSpec
from orchestrator.store.runs import TrialRow, trial_rows
from orchestrator.store.storage import SWEEP_BEST_FILE, SWEEP_RESULTS_FILE, SWEEP_TRIALS_DIR, RunFolder
from orchestrator.train.progress import print_listing


def leaderboard_rows(sweep: RunFolder, spec: JobSpec, trials: list[dict]) -> list[TrialRow]:
    """One row per trial of the sweep's record, best first, with its metrics from its run folder."""
    return trial_rows(sweep, trials, spec.sweep.metric, spec.sweep.mode, spec.schedule.epochs)


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


def finish_sweep(spec: JobSpec, raw: dict, sweep: RunFolder, rows: list[TrialRow], console: Console) -> dict:
    """results.parquet, best.yaml, the final table and the ASHA saving."""
    print_listing(console, leaderboard(rows, spec, f"sweep {spec.name}: every trial"), ("trial",))
    sweep.write_rows(SWEEP_RESULTS_FILE, [
        {"trial_id": r.trial_id, **{k: _cell(v) for k, v in r.values.items()}, "epochs_run": r.epochs_run,
         f"best_{spec.sweep.metric}": r.best, "status": r.status} for r in rows])
    scored = [r for r in rows if r.best is not None]
    if not scored:
        raise RuntimeError(f"no trial reported {spec.sweep.metric}; see the trial folders in {sweep.uri}/{SWEEP_TRIALS_DIR}")
    best = scored[0]
    best_raw = with_values(raw, best.values)
    best_raw["name"] = f"{spec.name}_best"
    best_job = spec_to_yaml(validate_spec(best_raw))
    sweep.write_text(SWEEP_BEST_FILE, f"# best of sweep {spec.name}: trial {best.trial_id}, {spec.sweep.metric} {best.best:.4f}\n{best_job}")
    used = sum(r.epochs_run for r in rows)
    full = len(rows) * spec.schedule.epochs
    console.print(f"best: trial {best.trial_id} ({', '.join(f'{k}={_cell(v)}' for k, v in best.values.items())}), "
                  f"{spec.sweep.metric} {best.best:.4f}")
    console.print(f"ASHA used {used} epochs of the {full} these {len(rows)} trials would use at full budget "
                  f"({used / full:.0%}; saved {full - used})")
    console.print(f"wrote {sweep.uri}/{SWEEP_RESULTS_FILE} and {sweep.uri}/{SWEEP_BEST_FILE}; train the best with: "
                  f"orchestrator train {sweep.uri}/{SWEEP_BEST_FILE}")
    return {"best_trial": best.trial_id, "best": best.best, "epochs_used": used, "epochs_full": full, "trials": len(rows)}


def _cell(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
