"""The progress protocol, both ends: the typed events rank 0 emits and the view that shows them.

Rank 0 of a run (`fit.py`) emits `Log`, `Trainability`, `EpochStart`, `Step` (throttled by
`step_reporter`), `EpochEnd` and `Summary`; they reach the driver directly (`--local`) or through a
Ray queue. `ProgressView.handle(event)` shows them: a bar per epoch, a row per epoch, a summary
table; it is the same for `--local` and for Ray runs. Also the process timing the first-step
figures are measured with (`seconds_since_process_start`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.store.metrics import DISPLAY, group_lrs


@dataclass(frozen=True)
class Log:
    text: str


@dataclass(frozen=True)
class Trainability:
    rows: list[tuple[str, int, int]]
    """(top-level module, parameters, trainable parameters)"""


@dataclass(frozen=True)
class EpochStart:
    epoch: int
    """0-based"""
    epochs: int
    steps: int
    """optimizer steps in the epoch"""


@dataclass(frozen=True)
class Step:
    epoch: int
    done: int
    """optimizer steps done in this epoch"""
    steps: int
    loss: float
    lr: float
    """the LR of the last parameter group"""
    images_per_s: float
    """all workers together, since the previous Step event"""


@dataclass(frozen=True)
class EpochEnd:
    row: dict
    """the epoch's metric row (metrics.epoch_row)"""
    best: bool


@dataclass(frozen=True)
class Summary:
    summary: dict


Event = Log | Trainability | EpochStart | Step | EpochEnd | Summary
STEP_EVENT_INTERVAL_S = 0.5


def step_reporter(emit: Callable[[Event], None], start: EpochStart, first_step: int, global_batch_size: int):
    """on_step(step, loss, lrs) emitting at most one Step per STEP_EVENT_INTERVAL_S (and the first and last);
    returns the loss it emitted, else None. `loss` may be a device tensor: it is read (the host waits for
    the device) only when a Step is emitted."""
    last = {"time": time.perf_counter(), "done": 0}

    def on_step(step: int, loss, lrs: list[float]) -> float | None:
        done = step - first_step + 1
        now = time.perf_counter()
        if done not in (1, start.steps) and now - last["time"] < STEP_EVENT_INTERVAL_S:
            return None
        images_per_s = (done - last["done"]) * global_batch_size / max(now - last["time"], 1e-9)
        last.update(time=now, done=done)
        value = float(loss)
        emit(Step(start.epoch, done, start.steps, value, lrs[-1] if lrs else 0.0, images_per_s))
        return value

    return on_step


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
        """boot_clock() when the first training step was seen"""

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def handle(self, event: Event) -> None:
        if isinstance(event, Log):
            self.console.print(f"[dim]{escape(event.text)}[/dim]")
        elif isinstance(event, Trainability):
            self.console.print(trainability_table(event.rows))
        elif isinstance(event, EpochStart):
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("", total=event.steps, epoch=event.epoch + 1, epochs=event.epochs,
                                               loss="-", lr="-", ips="-")
        elif isinstance(event, Step) and self.task is not None:
            if self.first_step_at is None:
                self.first_step_at = boot_clock()
            self.progress.update(self.task, completed=event.done, loss=f"{event.loss:.4f}", lr=f"{event.lr:.3g}",
                                 ips=f"{event.images_per_s:.0f}")
        elif isinstance(event, EpochEnd):
            self._row(event.row, event.best)
        elif isinstance(event, Summary):
            self.summary = event.summary

    def _row(self, row: dict, best: bool) -> None:
        """One line per epoch: epoch, the metrics.DISPLAY columns, the highest group LR, img/s, seconds."""
        if not self.header_shown:
            cells = [f"{'epoch':>5}"] + [f"{name:>{width}}" for name, width, _ in DISPLAY]
            self.console.print("[bold]" + " ".join(cells + [f"{'lr':>10}", f"{'img/s':>9}", f"{'epoch_s':>8}"]))
            self.header_shown = True
        lrs = [lr for lr in group_lrs(row).values() if lr is not None]
        cells = [f"{row['epoch'] + 1:>5}"] + [f"{_fmt(row[name], digits):>{width}}" for name, width, digits in DISPLAY]
        cells += [f"{max(lrs):.4g}".rjust(10) if lrs else f"{'-':>10}", f"{row['images_per_s']:>9.0f}", f"{row['epoch_s']:>8.1f}"]
        self.console.print(" ".join(cells) + ("  [green]* best[/green]" if best else ""))


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
        ("test balanced acc, macro F1", f"{_fmt(summary.get('test_balanced_acc'))}, {_fmt(summary.get('test_macro_f1'))}"),
        ("best val acc@1", f"{_fmt(summary.get('best_val_acc1'))} (epoch {summary['best_epoch'] + 1})" if summary.get("best_epoch") is not None else "-"),
        ("epochs", f"{summary['epochs_completed']} of {summary['epochs']}"
                   + (" (stopped early: schedule.early_stopping)" if summary.get("stopped_early_at_epoch") else "")),
        ("images/s (mean)", _fmt(summary.get("images_per_s_mean"), 0)),
        ("training time", f"{summary['wall_s']:.1f} s"),
        ("run folder", summary["run_folder"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def boot_clock() -> float:
    """Seconds on the machine's boot-time clock (CLOCK_BOOTTIME: monotonic, counts suspend, never stepped by
    NTP or a user setting the date; time.monotonic where there is none). The same clock in every process of
    a machine, and the one /proc counts a process's start on."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else time.monotonic()


_IMPORTED_AT = boot_clock()


def process_start_time() -> float:
    """When this process started, in boot_clock() seconds (Linux: its start tick in /proc/self/stat, counted
    from boot; elsewhere: when this module was imported). No wall clock is involved: a clock step after
    boot cannot move it."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return start_ticks / ticks if hasattr(time, "CLOCK_BOOTTIME") else _IMPORTED_AT
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


def seconds_since_process_start(at: float | None) -> float | None:
    """Seconds from this process's start to `at`, a boot_clock() reading (of this or another process of this machine)."""
    return None if at is None else at - process_start_time()


def print_listing(console: Console, table: Table, identifiers: tuple[str, ...]) -> None:
    """A listing whose identifier columns (run names, trial and job ids) never fold or truncate.

    In a terminal the other columns fold to fit its width (to READABLE_CELLS at least), and the rightmost
    of them are left out, and named, when even that does not fit. Piped or redirected, the table is
    printed whole at its natural width, without borders, one row per line: every cell can be copied,
    grepped and cut.
    """
    widths = [max(_cell_width(cell) for cell in [column.header, *column.cells]) for column in table.columns]
    for column, width in zip(table.columns, widths):
        is_id = column.header in identifiers
        column.no_wrap = is_id or not console.is_terminal
        column.overflow = "ignore" if column.no_wrap else "fold"
        column.min_width = width if column.no_wrap else min(width, READABLE_CELLS)
    if not console.is_terminal:
        table.box, table.show_edge, table.pad_edge = None, False, False
        whole = Console(file=console.file, width=sum(widths) + 2 * len(widths) + 1, highlight=False, color_system=None)
        whole.print(table, crop=False)
        return
    dropped = []
    while sum(c.min_width for c in table.columns) + 3 * len(table.columns) + 1 > console.width:
        others = [i for i, column in enumerate(table.columns) if column.header not in identifiers]
        if len(others) <= 1:
            break
        dropped.insert(0, str(table.columns.pop(others[-1]).header))
    console.print(table)
    if dropped:
        console.print(f"[dim]left out for the terminal's width: {escape(', '.join(dropped))} (--json has every field)[/dim]")


READABLE_CELLS = 8
"""the narrowest a folded column of a listing gets in a terminal"""


def _cell_width(cell) -> int:
    from rich.text import Text

    text = cell if isinstance(cell, Text) else Text.from_markup(str(cell))
    return text.cell_len
