"""`orchestrator report`: PNG plots (matplotlib, Agg) and one self-contained HTML page of a run or a sweep.

A run's page: the LR of every parameter group against the optimizer step, computed from plan.json
and the schedule (the pure function the loop calls, so warmup and decay are what ran), with the LR
recorded at each epoch's end on top; train and val loss, val acc@1/@5 and images/s against the
epoch; the summary and the per-epoch table. A sweep's page: each trial's metric against the epoch,
trials ASHA stopped early marked where they stopped, and the leaderboard. Images are embedded as
data: URIs, so the page opens offline and links to nothing. Imports no Ray.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from orchestrator.store.runs import read_metrics, read_summary, run_info, sweep_settings, trial_folder, trial_rows
from orchestrator.store.storage import PLAN_FILE, SWEEP_STATE_FILE, RunFolder

if TYPE_CHECKING:
    from orchestrator.train.lr_range import RangeTest

PLOT_DPI = 110


def new_figure(width_in: float = 7.0, height_in: float = 3.6):
    """(figure, axes) on the Agg canvas, outside pyplot's global state (safe in threads and tests)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def lr_by_step(spec, plan, rows: Sequence[dict]) -> dict[str, list[float]]:
    """{group name: its LR at every optimizer step 0..total_steps-1} from the plan and the schedule.

    ReduceLROnPlateau reads the recorded metric of the epochs finished before each step; steps past
    the last recorded epoch use every epoch recorded.
    """
    from orchestrator.config.schedule import group_multipliers, group_schedule

    schedules = {g.name: group_schedule(spec.schedule, g.schedule) for g in plan.param_groups}
    peaks = {g.name: g.lr for g in plan.param_groups}
    history = [r[spec.schedule.plateau_metric] for r in rows]
    curves: dict[str, list[float]] = {name: [] for name in schedules}
    for step in range(plan.total_steps):
        factors = group_multipliers(step, schedules, plan, history[:step // plan.steps_per_epoch])
        for name, factor in factors.items():
            curves[name].append(peaks[name] * factor)
    return curves


def lr_plot(spec, plan, rows: Sequence[dict]) -> bytes:
    from orchestrator.store.metrics import group_lrs

    fig, ax = new_figure()
    styles = ["-", "--", ":", "-."]
    for index, (name, curve) in enumerate(lr_by_step(spec, plan, rows).items()):
        line, = ax.plot(range(1, len(curve) + 1), curve, styles[index % len(styles)], label=f"{name} (plan)")
        recorded = [(r["step"], group_lrs(r).get(name)) for r in rows]
        recorded = [(s, lr) for s, lr in recorded if lr is not None]
        if recorded:
            ax.plot(*zip(*recorded), "o", color=line.get_color(), markersize=4, label=f"{name} (recorded)")
    if plan.warmup_steps:
        ax.axvline(plan.warmup_steps, color="grey", linestyle=":", linewidth=1)
        ax.annotate("end of warmup", (plan.warmup_steps, 0), xytext=(4, 4), textcoords="offset points",
                    fontsize=8, color="grey")
    ax.set_xlabel("optimizer step (steps done)")
    ax.set_ylabel("learning rate")
    ax.set_title(f"learning rate per parameter group ({spec.schedule.name}, {plan.warmup_steps} warmup steps)")
    ax.legend(fontsize=8)
    return figure_png(fig)


def _epochs(rows: Sequence[dict]) -> list[int]:
    return [r["epoch"] + 1 for r in rows]


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def series_plot(rows: Sequence[dict], keys: Sequence[tuple[str, str]], ylabel: str, title: str,
                log_when_spread: bool = False) -> bytes:
    """(column, label) series of the metric rows against the epoch (1-based); a log y axis when asked
    and the values span more than 20x (a first epoch's val loss can dwarf the rest)."""
    fig, ax = new_figure()
    for key, label in keys:
        points = [(e, r[key]) for e, r in zip(_epochs(rows), rows) if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-", markersize=3, label=label)
    _integer_epochs(ax)
    values = [r[k] for r in rows for k, _ in keys if r.get(k) is not None]
    if log_when_spread and values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
        title += " (log scale)"
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(keys) > 1:
        ax.legend(fontsize=8)
    return figure_png(fig)


def throughput_plot(rows: Sequence[dict]) -> bytes:
    """Training images/s per epoch and, on a second axis, the share of the training time spent waiting for
    data (data_wait_s / train_s, in %; runs from before it was recorded have none)."""
    fig, ax = new_figure()
    epochs = _epochs(rows)
    ax.plot(epochs, [r.get("images_per_s") for r in rows], "o-", markersize=3, label="images/s")
    ax.set_ylabel("training images / s")
    waits = [(e, 100 * r["data_wait_s"] / r["train_s"]) for e, r in zip(epochs, rows)
             if r.get("data_wait_s") is not None and r.get("train_s")]
    if waits:
        share = ax.twinx()
        share.plot(*zip(*waits), "s--", markersize=3, color="tab:red", label="waiting for data")
        share.set_ylabel("waiting for data, % of training time")
        share.set_ylim(0, 100)
    _integer_epochs(ax)
    ax.set_title("throughput")
    return figure_png(fig)


def run_plots(spec, plan, rows: Sequence[dict]) -> dict[str, bytes]:
    """File name -> PNG bytes of a run's plots."""
    return {
        "lr.png": lr_plot(spec, plan, rows),
        "loss.png": series_plot(rows, [("train_loss", "train loss"), ("val_loss", "val loss")], "cross-entropy", "loss",
                                log_when_spread=True),
        "accuracy.png": series_plot(rows, [("val_acc1", "val acc@1"), ("val_acc5", "val acc@5"),
                                             ("val_balanced_acc", "val balanced acc"), ("val_macro_f1", "val macro F1")],
                                      "accuracy", "validation accuracy"),
        "throughput.png": throughput_plot(rows),
    }


def _img(name: str, png: bytes) -> str:
    return (f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            "</figure>")


def _table(header: Sequence[str] | None, rows: Sequence[Sequence], css_class: str = "") -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape("-" if value is None else str(value))

    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}">{head}<tbody>{body}</tbody></table>'



STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
figure{margin:.6em 0}img{max-width:100%}.facts td{text-align:left}.facts td:first-child{font-weight:bold}"""


def page(title: str, body: str) -> bytes:
    """A whole HTML page with its style inline: no external URL anywhere."""
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n").encode()


def run_report(folder: RunFolder) -> dict[str, bytes]:
    """File name -> bytes of a run's report: the PNGs and index.html embedding them."""
    from orchestrator.after.trained import TrainedError, read_run_spec
    from orchestrator.config.plan import Plan

    spec = read_run_spec(folder)
    if not folder.exists(PLAN_FILE):
        raise TrainedError(f"{folder.uri} has no {PLAN_FILE}: the run has not started")
    plan = Plan.from_dict(folder.read_json(PLAN_FILE))
    rows = read_metrics(folder)
    info, summary = run_info(folder), read_summary(folder) or {}
    plots = run_plots(spec, plan, rows)
    facts = [("status", info.status), ("epochs", f"{info.epochs_completed} of {info.epochs}"),
             ("model", f"{spec.model.arch}, weights {spec.model.weights or 'none (from scratch)'}"),
             ("data", spec.data.source),
             ("global batch", f"{plan.global_batch_size} = {plan.per_worker_batch_size} x {plan.world_size} workers x "
                              f"{plan.grad_accum_steps} accumulation"),
             ("learning rate", plan.lr_derivation),
             ("best val acc@1", summary.get("best_val_acc1", info.best_val_acc1)),
             ("test acc@1", summary.get("test_acc1")), ("wall time (s)", info.wall_s)]
    if summary.get("message"):
        facts.append(("message", summary["message"]))
    columns = ["epoch", "step", "train_loss", "val_loss", "val_acc1", "val_acc5", "val_balanced_acc", "val_macro_f1",
               "images_per_s", "data_wait_s", "epoch_s"]
    body = (_table(None, facts, "facts")
            + "<h2>Learning rate</h2>" + _img("lr.png", plots["lr.png"])
            + "<h2>Loss and accuracy</h2>" + _img("loss.png", plots["loss.png"]) + _img("accuracy.png", plots["accuracy.png"])
            + "<h2>Throughput</h2>" + _img("throughput.png", plots["throughput.png"])
            + "<h2>Epochs</h2>" + _table(columns, [[r["epoch"] + 1, *(r.get(c) for c in columns[1:])] for r in rows]))
    return {**plots, "index.html": page(f"run {folder.name}", body)}


def sweep_plot(folder: RunFolder, rows, metric: str, lineage: dict[str, list] | None = None) -> bytes:
    """Each trial's metric against the epoch; an x where ASHA stopped a trial early; with PBT (`lineage`:
    trial id -> its perturbations) a dotted line from each trial's point to the donor's at every
    perturbation, where the trial went on from the donor's checkpoint."""
    fig, ax = new_figure(7.5, 4.2)
    stopped_label, taken_label = "stopped early by ASHA", "took a checkpoint (PBT)"
    curves = {row.trial_id: [(m["epoch"] + 1, m[metric]) for m in read_metrics(trial_folder(folder, row.trial_id))
                             if m.get(metric) is not None] for row in rows}
    for row in rows:
        points = curves[row.trial_id]
        if not points:
            continue
        line, = ax.plot(*zip(*points), "-", linewidth=1.2, label=row.trial_id if len(rows) <= 12 else None)
        if row.status == "stopped early":
            ax.plot(*points[-1], "x", color=line.get_color(), markersize=9, markeredgewidth=2, label=stopped_label)
            stopped_label = None
        for event in (lineage or {}).get(row.trial_id, []):
            if event.get("from_score") is None or event.get("score") is None:
                continue
            ax.plot([event["epoch"]] * 2, [event["score"], event["from_score"]], ":", color=line.get_color(),
                    marker="o", markersize=4, label=taken_label)
            ax.annotate(event["from"].removeprefix("trial_"), (event["epoch"], event["from_score"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", color=line.get_color())
            taken_label = None
    _integer_epochs(ax)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of every trial")
    ax.legend(fontsize=7, ncol=2)
    return figure_png(fig)


def sweep_report(folder: RunFolder) -> dict[str, bytes]:
    """File name -> bytes of a sweep's report: trials.png and index.html (leaderboard and the plot)."""
    trials = folder.read_json(SWEEP_STATE_FILE).get("trials", [])
    metric, mode, epochs = sweep_settings(folder, trials)
    rows = trial_rows(folder, trials, metric, mode, epochs)
    lineage = {t["id"]: t["lineage"] for t in trials if t.get("lineage")}
    plot = sweep_plot(folder, rows, metric, lineage)
    keys = list(rows[0].values) if rows else []
    board = _table(["trial", *keys, "epochs", f"best {metric}", "status"],
                   [[r.trial_id, *(r.values.get(k) for k in keys), f"{r.epochs_run}/{epochs or '?'}", r.best, r.status]
                    for r in rows])
    used, full = sum(r.epochs_run for r in rows), len(rows) * (epochs or 0)
    saving = f"<p>ASHA ran {used} of the {full} epochs these trials would run at full budget.</p>" if full and not lineage else ""
    body = ("<h2>Trials</h2>" + _img("trials.png", plot) + saving + _lineage_table(lineage)
            + f"<h2>Leaderboard ({html.escape(metric)}, {'higher' if mode == 'max' else 'lower'} is better)</h2>" + board)
    return {"trials.png": plot, "index.html": page(f"sweep {folder.name}", body)}


def _lineage_table(lineage: dict[str, list]) -> str:
    """PBT: one row per perturbation (after which epoch, which trial took whose checkpoint, the values it went on with)."""
    if not lineage:
        return ""
    events = sorted(((e["epoch"], trial, e) for trial, events in lineage.items() for e in events), key=lambda t: (t[0], t[1]))
    return ("<h2>Lineage (PBT)</h2>" + _table(["after epoch", "trial", "its score", "took the checkpoint of", "its score",
                                              "went on with"],
                                             [[epoch, trial, e.get("score"), e["from"], e.get("from_score"),
                                               ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in e["values"].items())] for epoch, trial, e in events]))


def range_plot(test: RangeTest, title: str) -> bytes:
    """PNG: raw and smoothed loss against the LR (log axis), the minimum and the suggestion marked."""
    fig, ax = new_figure()
    ax.plot(test.lrs, test.losses, color="0.75", linewidth=0.8, label="loss (per step)")
    ax.plot(test.lrs, test.smoothed, color="C0", linewidth=1.6, label="smoothed loss")
    ax.axvline(test.min_loss_lr, color="C3", linestyle=":", label=f"minimum at {test.min_loss_lr:.3g}")
    ax.axvline(test.suggested_lr, color="C2", linestyle="--", label=f"suggested {test.suggested_lr:.3g}")
    ax.set_xscale("log")
    ax.set_ylim(0, max(test.smoothed[: test.best_index + 1]) * 1.5)
    ax.set_xlabel(f"learning rate (lr_mult 1 group, global batch {test.global_batch_size})")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return figure_png(fig)
