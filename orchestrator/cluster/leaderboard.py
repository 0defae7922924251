"""A sweep's results: the leaderboard on screen, results.parquet, best.yaml (or any trial's job file), what
ASHA saved, and the Pareto front when the sweep has several objectives."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.config.errors import UserError
from orchestrator.config.jobfile import spec_to_yaml, validate_spec
from orchestrator.config.keys import with_values
from orchestrator.config.spec import JobSpec
from orchestrator.store.runs import TrialRow, trial_rows
from orchestrator.store.storage import SWEEP_BEST_FILE, SWEEP_RESULTS_FILE, SWEEP_TRIALS_DIR, RunFolder
from orchestrator.train.progress import print_listing


def leaderboard_rows(sweep: RunFolder, spec: JobSpec, trials: list[dict]) -> list[TrialRow]:
    """One row per trial of the sweep's record, best first, with its metrics from its run folder."""
    return trial_rows(sweep, trials, spec.sweep.metric, spec.sweep.mode, spec.schedule.epochs)


def leaderboard(rows: list[TrialRow], spec: JobSpec, title: str, extra: list[dict] | None = None,
                front: list[bool] | None = None) -> Table:
    """The table; `extra`: per row, the other objectives' {column: value}; `front`: per row, on the Pareto front."""
    table = Table(title=title, title_justify="left")
    table.add_column("trial")
    for key in spec.sweep.space:
        table.add_column(escape(key))
    table.add_column("epochs", justify="right")
    table.add_column(f"best {spec.sweep.metric}", justify="right")
    others = [c for c in extra[0] if c != f"best_{spec.sweep.metric}"] if extra else []
    for column in others:
        table.add_column(escape(column), justify="right")
    if front is not None:
        table.add_column("pareto", justify="center")
    table.add_column("status")
    for i, row in enumerate(rows):
        cells = [_text(v) for v in row.values.values()]
        more = [_text(extra[i][c]) for c in others] + (["*" if front[i] else ""] if front is not None else [])
        table.add_row(row.trial_id, *cells, f"{row.epochs_run}/{spec.schedule.epochs}",
                      "-" if row.best is None else f"{row.best:.4f}", *more, row.status)
    return table


def _text(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else escape(str(value))


def trial_job(spec: JobSpec, raw: dict, row: TrialRow, name: str, comment: str) -> str:
    """The trial's values applied to the job file, named `name`, as YAML under a comment line."""
    trial_raw = with_values(raw, row.values)
    trial_raw["name"] = name
    return f"# {comment}\n{spec_to_yaml(validate_spec(trial_raw))}"


def pick_trial(spec: JobSpec, raw: dict, sweep: RunFolder, trials: list[dict], trial_id: str) -> str:
    """--pick: write trial `trial_id` as a job file in the sweep folder; returns its URI."""
    rows = {r.trial_id: r for r in leaderboard_rows(sweep, spec, trials)}
    if trial_id not in rows:
        raise UserError(f"--pick: no trial {trial_id} in {sweep.uri}; trials: {', '.join(sorted(rows))}")
    row = rows[trial_id]
    score = "-" if row.best is None else f"{row.best:.4f}"
    sweep.write_text(f"{trial_id}.yaml", trial_job(spec, raw, row, f"{spec.name}_{trial_id}",
                                                   f"trial {trial_id} of sweep {spec.name}, {spec.sweep.metric} {score}"))
    return f"{sweep.uri}/{trial_id}.yaml"


def finish_sweep(spec: JobSpec, raw: dict, sweep: RunFolder, rows: list[TrialRow], console: Console) -> dict:
    """results.parquet (every objective; `pareto` with several), best.yaml (best of the first objective), the
    final table and the ASHA saving."""
    from orchestrator.cluster.objectives import objective_values, on_front

    several = len(spec.sweep.objective_list()) > 1
    extra = objective_values(sweep, spec, rows) if several else None
    front = on_front(spec, extra) if several else None
    print_listing(console, leaderboard(rows, spec, f"sweep {spec.name}: every trial", extra, front), ("trial",))
    sweep.write_rows(SWEEP_RESULTS_FILE, [
        {"trial_id": r.trial_id, **{k: _cell(v) for k, v in r.values.items()}, "epochs_run": r.epochs_run,
         f"best_{spec.sweep.metric}": r.best, **(extra[i] if several else {}),
         **({"pareto": front[i]} if several else {}), "status": r.status} for i, r in enumerate(rows)])
    scored = [r for r in rows if r.best is not None]
    if not scored:
        raise RuntimeError(f"no trial reported {spec.sweep.metric}; see the trial folders in {sweep.uri}/{SWEEP_TRIALS_DIR}")
    best = scored[0]
    sweep.write_text(SWEEP_BEST_FILE, trial_job(spec, raw, best, f"{spec.name}_best",
                                                f"best of sweep {spec.name}: trial {best.trial_id}, {spec.sweep.metric} {best.best:.4f}"))
    used = sum(r.epochs_run for r in rows)
    full = len(rows) * spec.schedule.epochs
    console.print(f"best: trial {best.trial_id} ({', '.join(f'{k}={_cell(v)}' for k, v in best.values.items())}), "
                  f"{spec.sweep.metric} {best.best:.4f}")
    if several:
        console.print(f"Pareto front ({', '.join(o.metric for o in spec.sweep.objective_list())}): "
                      + ", ".join(r.trial_id for r, on in zip(rows, front) if on)
                      + "; write any trial as a job file with: orchestrator sweep JOB --pick TRIAL")
    if spec.sweep.scheduler == "asha":
        console.print(f"ASHA used {used} epochs of the {full} these {len(rows)} trials would use at full budget "
                      f"({used / full:.0%}; saved {full - used})")
    console.print(f"wrote {sweep.uri}/{SWEEP_RESULTS_FILE} and {sweep.uri}/{SWEEP_BEST_FILE}; train the best with: "
                  f"orchestrator train {sweep.uri}/{SWEEP_BEST_FILE}")
    return {"best_trial": best.trial_id, "best": best.best, "epochs_used": used, "epochs_full": full, "trials": len(rows)}


def _cell(value):
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
