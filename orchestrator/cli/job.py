"""The commands that take a job file: validate, plan, train, sweep, find-lr."""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import (add_cluster_options, add_job_options, console, err_console, hold_run_folder,
                                     interrupted_exit, write_local)
from orchestrator.config.errors import UserError


def cmd_validate(args) -> int:
    from orchestrator.config.jobfile import load_spec
    from orchestrator.data.augment import check_transforms
    from orchestrator.train.models import check_arch
    from orchestrator.train.weights import check_references

    spec = load_spec(args.job, args.set)
    check_arch(spec.model.arch)
    spec = check_transforms(check_references(spec))
    console.print(f"{args.job}: ok (name {spec.name}, {spec.model.arch}, {spec.optim.name}, "
                  f"{spec.schedule.name} over {spec.schedule.epochs} epochs)")
    return 0

def recipe(spec) -> dict:
    """The recipe keys a job sets away from plain SGD-style training (what changes the numbers beyond the plan)."""
    model, data = spec.model, spec.data
    found = {"optimizer": spec.optim.name}
    if spec.optim.name == "lars":
        found["trust_coeff"] = spec.optim.trust_coeff
    for key, value in (("label_smoothing", spec.loss.label_smoothing), ("mixup_alpha", data.mixup_alpha),
                       ("cutmix_alpha", data.cutmix_alpha), ("ema_decay", model.ema_decay),
                       ("zero_init_residual", model.zero_init_residual), ("eval_resize", data.eval_resize)):
        if value:
            found[key] = value
    return found

def plan_table(plan, num_classes: int, spec=None) -> Table:
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
    if spec is not None:
        rows.append(("recipe", ", ".join(f"{k} {v}" for k, v in recipe(spec).items())))
    if plan.elastic_sizes:
        rows.append(("elastic", f"{plan.elastic_sizes[0]['world_size']} to {plan.elastic_sizes[-1]['world_size']} workers, "
                                "the global batch kept: " + "; ".join(
                                    f"{r['world_size']} x {r['per_worker_batch_size']} per worker x {r['grad_accum_steps']} accumulation"
                                    for r in plan.elastic_sizes)))
    if plan.class_weights:
        rows.append(("class weights", ", ".join(f"{w:.3g}" for w in plan.class_weights)
                     + (f" (loss.class_weights {spec.loss.class_weights})" if spec is not None and isinstance(spec.loss.class_weights, str) else "")))
    for key, value in rows:
        table.add_row(key, value)
    return table

def groups_table(plan) -> Table:
    table = Table(title="parameter groups", title_justify="left")
    for column in ("group", "lr", "weight decay", "schedule", "params", "trainable"):
        table.add_column(column, justify="left" if column in ("group", "schedule") else "right")
    for g in plan.param_groups:
        schedule = ", ".join(f"{k} {v}" for k, v in g.schedule.items()) if g.schedule else "the job's"
        table.add_row(escape(g.name), f"{g.lr:.6g}", f"{g.weight_decay:g}", escape(schedule),
                      "-" if g.num_params is None else f"{g.num_params:,}",
                      "-" if g.trainable is None else f"{g.trainable:,}")
    return table

def cmd_plan(args) -> int:
    from orchestrator.config.jobfile import load_spec
    from orchestrator.train.resolve import resolve_plan

    spec = load_spec(args.job, args.set)
    resolved = resolve_plan(spec, 1 if args.local else spec.scaling.max_workers)
    plan = resolved.plan
    if args.json:
        from orchestrator.store.storage import strict_json

        print(strict_json({**plan.to_dict(), "num_classes": resolved.num_classes, "recipe": recipe(spec)}))
        return 0
    console.print(plan_table(plan, resolved.num_classes, spec))
    console.print(groups_table(plan))
    if resolved.splits is None:
        console.print(f"[dim]note: data not readable here; planned with data.num_train_samples {plan.num_train_samples}[/dim]")
    for note in resolved.splits.notes if resolved.splits else []:
        console.print(f"[dim]note: {escape(note)}[/dim]")
    return 0

def cmd_train(args) -> int:
    from orchestrator.config.jobfile import load_spec
    from orchestrator.store.storage import with_absolute_paths
    from orchestrator.train.weights import check_references

    spec = with_absolute_paths(check_references(load_spec(args.job, args.set)))
    if not args.local:
        from orchestrator.cluster.local_cluster import resolve_address
        from orchestrator.cluster.submit import check_cluster_address

        args.address = resolve_address(args.address)
        check_cluster_address(args.address, args.insecure)
    from orchestrator.store.runs import spec_written_at

    lock = hold_run_folder(spec, "orchestrator train")
    spec_before = spec_written_at(lock.folder)
    try:
        # torch and torchvision (~3 s) are imported here, before Ray starts: a driver run as a Ray job loses
        # its working directory when ray.init registers the job (Ray extracts the job's working_dir again),
        # and torch's import resolves paths against it.
        from orchestrator.train.resolve import resolve_plan

        if args.local:
            resolved = resolve_plan(spec, 1)
        else:
            # Planning (reading the data, the model on the meta device) overlaps Ray's start-up, which
            # must run on the main thread; the plan is still printed before any worker starts.
            from orchestrator.cluster.session import start_ray_for

            with ThreadPoolExecutor(max_workers=1) as pool:
                planning = pool.submit(resolve_plan, spec, spec.scaling.max_workers)
                if args.address:
                    console.print(f"[dim]joining the Ray cluster at {escape(args.address)}[/dim]")
                start_ray_for(spec, args.address, args.verbose)
                resolved = planning.result()
        console.print(plan_table(resolved.plan, resolved.num_classes, spec))
        return _train_planned(args, spec, resolved)
    except BaseException as exc:
        _record_stop(lock.folder, exc, spec_before)
        raise
    finally:
        lock.release()

def _record_stop(folder, exc: BaseException, spec_before) -> None:
    """summary.json says the run was interrupted or failed, and why (only if this attempt had started)."""
    from orchestrator.cluster.launch import RunInterrupted
    from orchestrator.store.runs import record_stop

    if isinstance(exc, (KeyboardInterrupt, RunInterrupted)):
        record_stop(folder, "interrupted", "terminated (SIGTERM)" if interrupted_exit(exc) == 143 else "interrupted (Ctrl-C)",
                    spec_before)
    elif isinstance(exc, Exception):
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        record_stop(folder, "failed", first_line, spec_before)

def _train_planned(args, spec, resolved) -> int:
    from orchestrator.cluster.launch import open_run, say_resume, track_report, train_local, train_on_ray
    from orchestrator.train.progress import summary_table

    plan = resolved.plan
    start = open_run(spec)
    say_resume(console, start, plan.epochs)
    if args.local:
        summary, first_step_s = train_local(spec, plan, console, resolved.splits)
    else:
        summary, first_step_s = train_on_ray(spec, plan, console)
    track_report(spec, console)
    console.print(summary_table(summary))
    if first_step_s is not None:
        console.print(f"first training step {first_step_s:.1f} s after the command started")
    if summary["status"] != "completed":
        err_console.print(f"[red]error:[/red] {escape(summary.get('message') or summary['status'])}")
        latest = start.folder.latest_checkpoint()
        if latest:
            err_console.print(f"the last good checkpoint, {latest}, is kept in {summary['run_folder']}; "
                              "fix the job and re-run the same command to resume")
        else:
            err_console.print(f"no epoch finished, so no checkpoint was written to {summary['run_folder']}")
        return 1
    return 0

def cmd_sweep(args) -> int:
    from orchestrator.cluster.local_cluster import resolve_address
    from orchestrator.cluster.session import start_ray_for
    from orchestrator.cluster.submit import check_cluster_address
    from orchestrator.cluster.sweep import run_sweep
    from orchestrator.config.errors import SpecError
    from orchestrator.config.jobfile import apply_overrides, read_job_file, validate_spec
    from orchestrator.config.search import validate_space
    from orchestrator.store.storage import with_absolute_paths
    from orchestrator.train.resolve import check_weights_fit, resolve_plan
    from orchestrator.train.weights import check_references

    args.address = resolve_address(args.address)
    check_cluster_address(args.address, args.insecure)
    raw = apply_overrides(read_job_file(args.job), args.set)
    spec = with_absolute_paths(check_references(validate_spec(raw)))
    if not spec.sweep.space:
        raise SpecError(["sweep.space: empty; give at least one key to sweep, e.g. optim.base_lr: {loguniform: [1.0e-4, 1.0e-1]}"])
    validate_space(raw)
    if args.pick:
        return _pick(spec, raw, args.pick)
    if args.extend < 0:
        raise SpecError([f"--extend: a number of trials >= 1 (got {args.extend})"])
    # the job's data and weights, checked once here: a problem is one line and exit 2, not one traceback per trial
    check_weights_fit(spec, resolve_plan(spec, spec.scaling.max_workers))
    lock = hold_run_folder(spec, "orchestrator sweep")
    try:
        start_ray_for(spec, args.address, args.verbose)
        summary = run_sweep(spec, raw, console, resume=args.resume, verbose=args.verbose, extend=args.extend)
    finally:
        lock.release()
    return 0 if summary else 1


def _pick(spec, raw: dict, trial_id: str) -> int:
    from orchestrator.cluster.leaderboard import pick_trial
    from orchestrator.cluster.sweep import read_state
    from orchestrator.store.storage import SWEEP_STATE_FILE, RunFolder

    sweep = RunFolder(spec.run.storage, spec.name)
    state = read_state(sweep)
    if state is None:
        raise UserError(f"--pick: no sweep in {sweep.uri} (no {SWEEP_STATE_FILE})")
    written = pick_trial(spec, raw, sweep, state["trials"], trial_id)
    console.print(f"wrote {written}; train it with: orchestrator train {written}")
    return 0

def cmd_find_lr(args) -> int:
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from orchestrator.after.report import range_plot
    from orchestrator.config.jobfile import load_spec
    from orchestrator.store.storage import strict_json
    from orchestrator.train.lr_range import range_test, table_rows
    from orchestrator.train.weights import check_references

    spec = check_references(load_spec(args.job, args.set))
    out = Path(args.out or f"find_lr_{spec.name}.png")
    show = err_console if args.json else console
    with Progress(TextColumn("LR range test"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  console=show, transient=True) as bar:
        task = bar.add_task("", total=args.steps)
        test = range_test(spec, args.steps, args.start_lr, args.end_lr,
                          on_step=lambda step, lr, loss: bar.update(task, completed=step + 1,
                                                                     description=f"lr {lr:.3g} loss {loss:.4f}"))
    write_local(out, range_plot(test, f"LR range test of {spec.name}"))
    if args.json:
        print(strict_json(test.to_json()))
        err_console.print(f"wrote {out.resolve()}")
        return 0
    table = Table(title=f"LR range test of {spec.name}: global batch {test.global_batch_size} "
                        f"({test.micro_batches_per_step} micro-batches of {spec.scaling.per_worker_batch_size} per step); {test.stopped}",
                  title_justify="left")
    for column in ("lr", "loss", "smoothed loss"):
        table.add_column(column, justify="right")
    for lr, loss, smoothed in table_rows(test):
        table.add_row(f"{lr:.3g}", f"{loss:.4f}", f"{smoothed:.4f}")
    console.print(table)
    console.print(f"smoothed loss lowest at lr {test.min_loss_lr:.3g}; suggested lr {test.suggested_lr:.3g} at global batch "
                  f"{test.global_batch_size} = base_lr {test.suggested_base_lr:.3g} at base_batch_size "
                  f"{test.base_batch_size} ({test.lr_scaling} scaling; the job has {spec.optim.base_lr:g})")
    console.print(f"wrote {out.resolve()}")
    console.print(f"use it: orchestrator train {args.job} --set optim.base_lr={test.suggested_base_lr:.3g}")
    return 0


def add_validate(p: argparse.ArgumentParser) -> None:
    """check a job file; exit 2 with one line per problem"""
    add_job_options(p)


def add_plan(p: argparse.ArgumentParser) -> None:
    """print the resolved plan: global batch, scaled LR, steps, parameter groups"""
    add_job_options(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--local", action="store_true", help="plan for one in-process worker (as train --local)")


def add_train(p: argparse.ArgumentParser) -> None:
    """train the job: Ray Train DDP workers, or --local in this process"""
    add_job_options(p)
    p.add_argument("--local", action="store_true", help="run the same loop in this process (world size 1, no Ray)")
    add_cluster_options(p, "Ray cluster to run on: auto (the cluster `orchestrator up` started, else Ray's auto), "
                           "HOST:PORT, ray://HOST:10001; default: start a local Ray",
                        verbose_help="show Ray's own logs instead of writing them to the run folder")


def add_sweep(p: argparse.ArgumentParser) -> None:
    """search over the job's sweep.space with Ray Tune (random, grid or TPE; ASHA or PBT); leaderboard,
    results.parquet, best.yaml"""
    add_job_options(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--extend", type=int, metavar="N", default=0,
                   help="N more trials (search random: draws) on the sweep of the same name, finished or not")
    p.add_argument("--pick", metavar="TRIAL", help="write trial TRIAL of the sweep as a job file (runs nothing)")
    add_cluster_options(p, "Ray cluster to run on (auto: the one `orchestrator up` started); default: start a local Ray",
                        verbose_help="show Ray's own logs")


def add_find_lr(p: argparse.ArgumentParser) -> None:
    """LR range test on one process at the job's global batch; suggests optim.base_lr"""
    add_job_options(p)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of the exponential ramp (default 100)")
    p.add_argument("--start-lr", type=float, default=1e-6, help="LR at the first step (default 1e-6)")
    p.add_argument("--end-lr", type=float, default=10.0, help="LR at the last step (default 10)")
    p.add_argument("--out", help="PNG to write (default ./find_lr_NAME.png)")
    p.add_argument("--json", action="store_true",
                   help='print {"suggested_lr", "suggested_base_lr", "min_loss_lr", "global_batch_size", ..., "points"}')


def cmd_doctor(args) -> int:
    from orchestrator.config.jobfile import load_spec
    from orchestrator.store.storage import strict_json
    from orchestrator.train.doctor import diagnose
    from orchestrator.train.weights import check_references

    if args.steps < 2:
        raise DoctorUsageError(f"--steps: {args.steps}; give at least 2")
    spec = check_references(load_spec(args.job, args.set))
    show = err_console if args.json else console
    with show.status(f"timing {spec.name}: each stage of a batch, then {args.steps} steps"):
        found = diagnose(spec, args.steps)
    if args.json:
        print(strict_json(found.to_json()))
        return 0
    table = Table(title=f"{spec.name}: one batch of {spec.scaling.per_worker_batch_size}, stage by stage, in one process",
                  title_justify="left")
    for column in ("stage", "ms"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, ms in found.stages.items():
        table.add_row(stage.removesuffix("_ms").replace("_", " "), f"{ms:.1f}")
    console.print(table)
    console.print(f"{found.images_per_s:.0f} images/s in {args.steps} steps; waiting for data "
                  f"{100 * found.data_wait_fraction:.0f}% of the time")
    for line in found.advice:
        console.print(escape(line))
    return 0


class DoctorUsageError(UserError):
    """A doctor option out of range."""


def add_doctor(p: argparse.ArgumentParser) -> None:
    """time each stage of the job's batches (read, decode, augment, copy, step) and name the bottleneck"""
    add_job_options(p)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of the timed pass at LR 0 (default 30)")
    p.add_argument("--json", action="store_true",
                   help='print {"images_per_s", "data_wait_fraction", "stages": {"read_ms", ...}, "advice": [...]}')
