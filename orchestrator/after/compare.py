"""`orchestrator report RUN RUN [...] --out DIR`: several runs (a sweep: its trials) side by side.

The curves share their axes: validation acc@1, train and validation loss and the LR (the `rest` group's,
else the first) against the images seen (optimizer steps x global batch), so runs of other batch sizes
or epoch counts line up; one table gives each run's facts and final figures. Imports no Ray or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.after.report import _img, _table, figure_png, lr_by_step, new_figure, page
from orchestrator.config.plan import REST_GROUP, Plan
from orchestrator.store.runs import folder_kind, read_metrics, read_summary, trial_folder
from orchestrator.store.storage import PLAN_FILE, SWEEP_STATE_FILE, RunFolder


@dataclass
class Compared:
    label: str
    spec: object
    plan: Plan
    rows: list[dict]
    summary: dict


def expand(folders: Sequence[RunFolder]) -> list[RunFolder]:
    """The run folders to compare: each run as given, a sweep as its trials (in their order)."""
    out = []
    for folder in folders:
        if folder_kind(folder) == "sweep":
            out += [trial_folder(folder, t["id"]) for t in folder.read_json(SWEEP_STATE_FILE).get("trials", [])
                    if trial_folder(folder, t["id"]).exists(PLAN_FILE)]
        else:
            out.append(folder)
    return out


def _load(folder: RunFolder) -> Compared:
    from orchestrator.after.trained import TrainedError, read_run_spec

    if not folder.exists(PLAN_FILE):
        raise TrainedError(f"{folder.uri} has no {PLAN_FILE}: the run has not started")
    return Compared(folder.name, read_run_spec(folder), Plan.from_dict(folder.read_json(PLAN_FILE)), read_metrics(folder),
                    read_summary(folder) or {})


def _curves(runs: list[Compared], key: str, ylabel: str, title: str, log: bool = False) -> bytes:
    fig, ax = new_figure(7.5, 4.0)
    for run in runs:
        points = [(r["step"] * run.plan.global_batch_size, r[key]) for r in run.rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-", markersize=3, label=run.label)
    ax.set_xlabel("images seen")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    return figure_png(fig)


def _lr_curves(runs: list[Compared]) -> bytes:
    fig, ax = new_figure(7.5, 4.0)
    for run in runs:
        curves = lr_by_step(run.spec, run.plan, run.rows)
        lrs = curves.get(REST_GROUP) or next(iter(curves.values()), [])
        ax.plot([(step + 1) * run.plan.global_batch_size for step in range(len(lrs))], lrs, label=run.label)
    ax.set_xlabel("images seen")
    ax.set_ylabel("learning rate")
    ax.set_title("learning rate (rest group)")
    ax.legend(fontsize=8)
    return figure_png(fig)


def _facts(run: Compared) -> list:
    spec, plan, summary = run.spec, run.plan, run.summary
    last = run.rows[-1] if run.rows else {}
    return [run.label, spec.model.arch, spec.model.weights or "scratch", f"{len(run.rows)}/{plan.epochs}",
            plan.global_batch_size, plan.scaled_lr, last.get("val_acc1"), summary.get("best_val_acc1"),
            summary.get("test_acc1"), last.get("train_loss"), summary.get("wall_s"), summary.get("status")]


def compare_report(folders: Sequence[RunFolder]) -> dict[str, bytes]:
    """File name -> bytes: accuracy.png, loss.png, val_loss.png, lr.png and index.html with the table."""
    folders = expand(folders)
    runs = [_load(folder) for folder in folders]
    if len({run.label for run in runs}) < len(runs):   # same names in other storages: their whole URIs
        for run, folder in zip(runs, folders):
            run.label = folder.uri
    plots = {"accuracy.png": _curves(runs, "val_acc1", "val acc@1", "validation accuracy"),
             "loss.png": _curves(runs, "train_loss", "train loss", "training loss", log=True),
             "val_loss.png": _curves(runs, "val_loss", "val loss", "validation loss", log=True),
             "lr.png": _lr_curves(runs)}
    header = ["run", "arch", "weights", "epochs", "global batch", "scaled LR", "final val acc@1", "best val acc@1",
              "test acc@1", "final train loss", "wall s", "status"]
    body = (_table(header, [_facts(run) for run in runs])
            + "".join(f"<h2>{name.removesuffix('.png').replace('_', ' ')}</h2>" + _img(name, png) for name, png in plots.items()))
    return {**plots, "index.html": page(f"{len(runs)} runs: {', '.join(run.label for run in runs)}"[:200], body)}
