"""The table of commands: a name, the function that adds its options (its docstring is the command's
--help), the function that runs it. Adding a command is its module plus one row here."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.cli import after, bench, cluster, data, job


@dataclass(frozen=True)
class Command:
    name: str
    add_options: Callable
    run: Callable

    @property
    def help(self) -> str:
        return inspect.getdoc(self.add_options)


COMMANDS = (
    Command("validate", job.add_validate, job.cmd_validate),
    Command("plan", job.add_plan, job.cmd_plan),
    Command("train", job.add_train, job.cmd_train),
    Command("sweep", job.add_sweep, job.cmd_sweep),
    Command("submit", cluster.add_submit, cluster.cmd_submit),
    Command("jobs", cluster.add_jobs, cluster.cmd_jobs),
    Command("runs", after.add_runs, after.cmd_runs),
    Command("report", after.add_report, after.cmd_report),
    Command("export", after.add_export, after.cmd_export),
    Command("evaluate", after.add_evaluate, after.cmd_evaluate),
    Command("predict", after.add_predict, after.cmd_predict),
    Command("up", cluster.add_up, cluster.cmd_up),
    Command("down", cluster.add_down, cluster.cmd_down),
    Command("find-lr", job.add_find_lr, job.cmd_find_lr),
    Command("doctor", job.add_doctor, job.cmd_doctor),
    Command("pack", data.add_pack, data.cmd_pack),
    Command("bench", bench.add_bench, bench.cmd_bench),
)
