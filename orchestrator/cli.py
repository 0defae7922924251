"""The `orchestrator` command line: validate, plan, train, bench.

Every user error (bad job file, missing data, weights that do not fit) exits with code 2 and one
line per problem, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

EXIT_USER_ERROR = 2

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from orchestrator.data import DataError, ImageReadError
    from orchestrator.models import ModelError, WeightsError
    from orchestrator.plan import PlanError
    from orchestrator.spec import SpecError

    return SpecError, PlanError, DataError, ImageReadError, WeightsError, ModelError


def _report_user_error(exc: BaseException) -> int:
    lines = getattr(exc, "problems", None) or str(exc).splitlines() or [type(exc).__name__]
    for line in lines:
        err_console.print(f"[red]error:[/red] {line}", markup=True, soft_wrap=True)
    return EXIT_USER_ERROR


def cmd_validate(args) -> int:
    from orchestrator.spec import load_spec

    spec = load_spec(args.job, args.set)
    console.print(f"{args.job}: ok (name {spec.name}, {spec.model.arch}, {spec.optim.name}, "
                  f"{spec.schedule.name} over {spec.schedule.epochs} epochs)")
    return 0


def plan_table(plan, num_classes: int) -> Table:
    table = Table(title="plan", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    rows = [
        ("world size", f"{plan.world_size} workers"),
        ("global batch", f"{plan.global_batch_size} images = {plan.per_worker_batch_size} per worker x "
                         f"{plan.world_size} workers x {plan.grad_accum_steps} accumulation steps"),
        ("learning rate", plan.lr_derivation),
        ("training images", f"{plan.num_train_samples} ({num_classes} classes)"),
        ("steps per epoch", f"{plan.steps_per_epoch} optimizer steps; last partial batch dropped "
                            f"({plan.dropped_samples_per_epoch} images per epoch)"),
        ("warmup", f"{plan.warmup_steps} steps ({plan.warmup_epochs:g} epochs)"),
        ("total", f"{plan.total_steps} steps ({plan.epochs} epochs)"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def groups_table(plan) -> Table:
    table = Table(title="parameter groups", title_justify="left")
    for column in ("group", "lr", "weight decay", "params", "trainable"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for g in plan.param_groups:
        table.add_row(escape(g.name), f"{g.lr:.6g}", f"{g.weight_decay:g}",
                      "-" if g.num_params is None else f"{g.num_params:,}",
                      "-" if g.trainable is None else f"{g.trainable:,}")
    return table


def cmd_plan(args) -> int:
    from orchestrator.prepare import resolve_plan
    from orchestrator.spec import load_spec

    spec = load_spec(args.job, args.set)
    resolved = resolve_plan(spec, 1 if args.local else spec.scaling.num_workers)
    plan = resolved.plan
    if args.json:
        print(json.dumps({**plan.to_dict(), "num_classes": resolved.num_classes}, indent=2))
        return 0
    console.print(plan_table(plan, resolved.num_classes))
    console.print(groups_table(plan))
    if resolved.splits is None:
        console.print(f"[dim]note: data not readable here; planned with data.num_train_samples {plan.num_train_samples}[/dim]")
    for note in resolved.splits.notes if resolved.splits else []:
        console.print(f"[dim]note: {escape(note)}[/dim]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description="Fine-tune torchvision image classifiers with Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    def job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("job", help="YAML job file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a job-file key, value typed as YAML (repeatable), e.g. --set optim.base_lr=0.01")
        return p

    p = job_command("validate", "check a job file; exit 2 with one line per problem")
    p.set_defaults(func=cmd_validate)
    p = job_command("plan", "print the resolved plan: global batch, scaled LR, steps, parameter groups")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--local", action="store_true", help="plan for one in-process worker (as train --local)")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_error_types() as exc:
        return _report_user_error(exc)


if __name__ == "__main__":
    sys.exit(main())
