"""What the driver shows while a run trains: a bar per epoch, a row per epoch, a summary table.

`ProgressView.handle(event)` takes the events rank 0 emits (`fit.py`): log, trainability,
epoch_start, step, epoch_end, summary. It is the same for `--local` and for Ray runs.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROW_FORMAT = "{epoch:>5} {train_loss:>10} {val_loss:>9} {val_acc1:>8} {val_acc5:>8} {lr:>10} {images_per_s:>9} {epoch_s:>8}"


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class ProgressView:
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"), TimeElapsedColumn(),
            console=console, transient=True,
        )
        self.task = None
        self.header_shown = False
        self.summary: dict | None = None
        self.first_step_at: float | None = None
        """time.time() when the first training step was seen"""

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def handle(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "log":
            self.console.print(f"[dim]{escape(event['text'])}[/dim]")
        elif kind == "trainability":
            self.console.print(trainability_table(event["rows"]))
        elif kind == "epoch_start":
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("", total=event["steps"], epoch=event["epoch"] + 1, epochs=event["epochs"],
                                               loss="-", lr="-", ips="-")
        elif kind == "step" and self.task is not None:
            if self.first_step_at is None:
                self.first_step_at = time.time()
            self.progress.update(self.task, completed=event["done"], loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.3g}",
                                 ips=f"{event['images_per_s']:.0f}")
        elif kind == "epoch_end":
            self._row(event["row"], event.get("best", False))
        elif kind == "summary":
            self.summary = event["summary"]

    def _row(self, row: dict, best: bool) -> None:
        if not self.header_shown:
            self.console.print("[bold]" + ROW_FORMAT.format(epoch="epoch", train_loss="train_loss", val_loss="val_loss",
                                                            val_acc1="val_acc1", val_acc5="val_acc5", lr="lr",
                                                            images_per_s="img/s", epoch_s="epoch_s"))
            self.header_shown = True
        lrs = [v for k, v in row.items() if k.startswith("lr/")]
        line = ROW_FORMAT.format(epoch=row["epoch"] + 1, train_loss=_fmt(row["train_loss"]), val_loss=_fmt(row["val_loss"]),
                                 val_acc1=_fmt(row["val_acc1"]), val_acc5=_fmt(row["val_acc5"]),
                                 lr=f"{max(lrs):.4g}" if lrs else "-", images_per_s=f"{row['images_per_s']:.0f}",
                                 epoch_s=f"{row['epoch_s']:.1f}")
        self.console.print(line + ("  [green]* best[/green]" if best else ""))


def trainability_table(rows) -> Table:
    table = Table(title="trainable parameters", title_justify="left")
    for column in ("module", "params", "trainable"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for module, total, trainable in rows:
        style = None if trainable else "dim"
        table.add_row(escape(module), f"{total:,}", f"{trainable:,}", style=style)
    return table


def summary_table(summary: dict) -> Table:
    table = Table(title=f"summary: {summary['name']} ({summary['status']})", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    rows = [
        ("test acc@1", _fmt(summary.get("test_acc1"))),
        ("test acc@5", _fmt(summary.get("test_acc5"))),
        ("best val acc@1", f"{_fmt(summary.get('best_val_acc1'))} (epoch {summary['best_epoch'] + 1})" if summary.get("best_epoch") is not None else "-"),
        ("epochs", f"{summary['epochs_completed']} of {summary['epochs']}"),
        ("images/s (mean)", _fmt(summary.get("images_per_s_mean"), 0)),
        ("training time", f"{summary['wall_s']:.1f} s"),
        ("run folder", summary["run_folder"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
