"""A sweep's objectives beyond sweep.metric: another metric's best epoch, or a measure of the trial's
trained model (`params`; `latency_ms`, ms per image at batch 1 on one CPU thread, BatchNorm folded as
`export` folds it), measured once per trial and kept in its run folder (measures.json)."""

from __future__ import annotations

import torch

from orchestrator.config.catalog import TRIAL_MEASURES
from orchestrator.config.spec import JobSpec
from orchestrator.store.runs import TrialRow, best_of, read_metrics, trial_folder
from orchestrator.store.storage import MEASURES_FILE, RunFolder
from orchestrator.cluster.suggest import pareto_front

LATENCY_BUDGET_S = 0.5
"""time spent timing one trial's model"""


def measure_trial(folder: RunFolder) -> dict:
    """{"params", "latency_ms"} of the trial's trained model (best checkpoint, else latest), from measures.json
    when measured before."""
    if folder.exists(MEASURES_FILE):
        return folder.read_json(MEASURES_FILE)
    from orchestrator.after.export import inference_ms
    from orchestrator.after.fold import FoldError, fold_batchnorm
    from orchestrator.after.trained import load_run

    trained = load_run(folder)
    try:
        model, _ = fold_batchnorm(trained.model)
    except FoldError:
        model = trained.model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        latency = inference_ms(model, trained.spec.data.image_size, 1, budget_s=LATENCY_BUDGET_S)
    finally:
        torch.set_num_threads(threads)
    measures = {"params": sum(p.numel() for p in trained.model.parameters()), "latency_ms": latency}
    folder.write_json(MEASURES_FILE, measures)
    return measures


def objective_column(metric: str) -> str:
    """The results.parquet column of an objective: best_<metric> for a per-epoch metric, else its name."""
    return metric if metric in TRIAL_MEASURES else f"best_{metric}"


def objective_values(sweep: RunFolder, spec: JobSpec, rows: list[TrialRow]) -> list[dict[str, float | None]]:
    """Per trial row, {column: value} of every objective (None where a trial has no value: not trained yet)."""
    out = []
    for row in rows:
        folder = trial_folder(sweep, row.trial_id)
        values: dict[str, float | None] = {}
        for objective in spec.sweep.objective_list():
            column = objective_column(objective.metric)
            if objective.metric == spec.sweep.metric:
                values[column] = row.best
            elif objective.metric in TRIAL_MEASURES:
                values[column] = measure_trial(folder)[objective.metric] if row.epochs_run else None
            else:
                values[column] = best_of(read_metrics(folder), objective.metric, objective.mode)
        out.append(values)
    return out


def on_front(spec: JobSpec, values: list[dict[str, float | None]]) -> list[bool]:
    """Whether each trial is on the Pareto front of the sweep's objectives."""
    objectives = spec.sweep.objective_list()
    points = [[v[objective_column(o.metric)] for o in objectives] for v in values]
    return pareto_front(points, [o.mode for o in objectives])
