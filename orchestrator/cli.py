"""The `orchestrator` command line: validate, plan, train, sweep, submit, jobs, runs, report, export,
evaluate, predict, find-lr, up, down, pack, bench.

Every user error (bad job file, missing data, weights that do not fit) exits with code 2 and one
line per problem, never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.markup import escape
from rich.table import Table

EXIT_USER_ERROR = 2

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exit-2 errors: fit.FINAL_ERRORS (the job, data, weights, checkpoints: the same list the Ray
    workers do not retry) and what only the driver raises (the spec, the run folder, the cluster)."""
    from orchestrator.fit import FINAL_ERRORS
    from orchestrator.local_cluster import ClusterError
    from orchestrator.lr_range import RangeTestError
    from orchestrator.pack import PackError
    from orchestrator.runlock import RunLocked
    from orchestrator.runs import RunsError
    from orchestrator.spec import SpecError
    from orchestrator.storage import RunFolderUnusable
    from orchestrator.submit import SubmitError
    from orchestrator.trained import TrainedError

    return (*FINAL_ERRORS, SpecError, SubmitError, SubmitUsageError, RunLocked, RunFolderUnusable, TrainedError,
            RunsError, RangeTestError, ClusterError, PackError)


def _report_user_error(exc: BaseException) -> int:
    lines = getattr(exc, "problems", None) or str(exc).splitlines() or [type(exc).__name__]
    for line in lines:
        err_console.print(f"[red]error:[/red] {escape(line)}", markup=True, soft_wrap=True)
    return EXIT_USER_ERROR


def cmd_validate(args) -> int:
    from orchestrator.spec import check_references, check_transforms, load_spec

    spec = check_transforms(check_references(load_spec(args.job, args.set)))
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
    from orchestrator.resolve import resolve_plan
    from orchestrator.spec import load_spec

    spec = load_spec(args.job, args.set)
    resolved = resolve_plan(spec, 1 if args.local else spec.scaling.num_workers)
    plan = resolved.plan
    if args.json:
        from orchestrator.storage import strict_json

        print(strict_json({**plan.to_dict(), "num_classes": resolved.num_classes, "recipe": recipe(spec)}))
        return 0
    console.print(plan_table(plan, resolved.num_classes, spec))
    console.print(groups_table(plan))
    if resolved.splits is None:
        console.print(f"[dim]note: data not readable here; planned with data.num_train_samples {plan.num_train_samples}[/dim]")
    for note in resolved.splits.notes if resolved.splits else []:
        console.print(f"[dim]note: {escape(note)}[/dim]")
    return 0


def hold_run_folder(spec, command: str):
    """The run folder's lock (exit 2 naming the holder when another run has it); says what it took over."""
    from orchestrator.runlock import RunLock
    from orchestrator.storage import RunFolder

    lock = RunLock(RunFolder(spec.run.storage, spec.name), command).acquire()
    for note in lock.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    return lock


def cmd_train(args) -> int:
    from orchestrator.spec import check_references, load_spec, with_absolute_paths

    spec = with_absolute_paths(check_references(load_spec(args.job, args.set)))
    if not args.local:
        from orchestrator.local_cluster import resolve_address
        from orchestrator.submit import check_cluster_address

        args.address = resolve_address(args.address)
        check_cluster_address(args.address, args.insecure)
    from orchestrator.runs import spec_written_at

    lock = hold_run_folder(spec, "orchestrator train")
    spec_before = spec_written_at(lock.folder)
    try:
        # torch and torchvision (~3 s) are imported here, before Ray starts: a driver run as a Ray job loses
        # its working directory when ray.init registers the job (Ray extracts the job's working_dir again),
        # and torch's import resolves paths against it.
        from orchestrator.resolve import resolve_plan

        if args.local:
            resolved = resolve_plan(spec, 1)
        else:
            # Planning (reading the data, the model on the meta device) overlaps Ray's start-up, which
            # must run on the main thread; the plan is still printed before any worker starts.
            from orchestrator.session import start_ray_for

            with ThreadPoolExecutor(max_workers=1) as pool:
                planning = pool.submit(resolve_plan, spec, spec.scaling.num_workers)
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
    from orchestrator.launch import RunInterrupted
    from orchestrator.runs import record_stop

    if isinstance(exc, (KeyboardInterrupt, RunInterrupted)):
        record_stop(folder, "interrupted", "terminated (SIGTERM)" if _interrupted_exit(exc) == 143 else "interrupted (Ctrl-C)",
                    spec_before)
    elif isinstance(exc, Exception):
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        record_stop(folder, "failed", first_line, spec_before)


def _train_planned(args, spec, resolved) -> int:
    from orchestrator.launch import open_run, say_resume, train_local, train_on_ray
    from orchestrator.progress import summary_table

    plan = resolved.plan
    start = open_run(spec)
    say_resume(console, start, plan.epochs)
    if args.local:
        summary, first_step_s = train_local(spec, plan, console, resolved.splits)
    else:
        summary, first_step_s = train_on_ray(spec, plan, console)
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
    from orchestrator.resolve import check_weights_fit, resolve_plan
    from orchestrator.session import start_ray_for
    from orchestrator.spec import (SpecError, apply_overrides, check_references, read_job_file, validate_spec,
                                   with_absolute_paths)
    from orchestrator.search import validate_space
    from orchestrator.sweep import run_sweep

    from orchestrator.local_cluster import resolve_address
    from orchestrator.submit import check_cluster_address

    args.address = resolve_address(args.address)
    check_cluster_address(args.address, args.insecure)
    raw = apply_overrides(read_job_file(args.job), args.set)
    spec = with_absolute_paths(check_references(validate_spec(raw)))
    if not spec.sweep.space:
        raise SpecError(["sweep.space: empty; give at least one key to sweep, e.g. optim.base_lr: {loguniform: [1.0e-4, 1.0e-1]}"])
    validate_space(raw)
    # the job's data and weights, checked once here: a problem is one line and exit 2, not one traceback per trial
    check_weights_fit(spec, resolve_plan(spec, spec.scaling.num_workers))
    lock = hold_run_folder(spec, "orchestrator sweep")
    try:
        start_ray_for(spec, args.address, args.verbose)
        summary = run_sweep(spec, raw, console, resume=args.resume, verbose=args.verbose)
    finally:
        lock.release()
    return 0 if summary else 1


def cmd_submit(args) -> int:
    from orchestrator import submit
    from orchestrator.local_cluster import resolve_dashboard
    from orchestrator.spec import check_transforms, load_spec

    spec = check_transforms(load_spec(args.job, args.set))  # a bad job file: exit 2, nothing sent
    args.address = resolve_dashboard(args.address)
    warning = submit.remote_storage_warning(spec)
    if warning:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    job_id = submit.submit(spec, args.address, insecure=args.insecure)
    console.print(f"submitted {spec.name} as job {job_id} to {args.address}")
    console.print(f"follow it with: orchestrator jobs logs {job_id} --follow --address {args.address}")
    if not args.follow:
        return 0
    return 0 if submit.follow(args.address, job_id, console) == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    from orchestrator import submit
    from orchestrator.local_cluster import resolve_dashboard

    args.address = resolve_dashboard(args.address)
    submit.check_transport(args.address, args.insecure)
    jobs = submit.client(args.address)
    if args.action == "list":
        table = Table(title=f"jobs on {args.address}", title_justify="left")
        for column in ("job id", "status", "entrypoint", "start"):
            table.add_column(column)
        for job in jobs.list_jobs():
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
            table.add_row(job.submission_id or job.job_id or "-", str(job.status.value), escape(job.entrypoint), started)
        console.print(table)
        return 0
    if not args.job_id:
        raise SubmitUsageError(f"orchestrator jobs {args.action} needs a job id")
    if args.action == "status":
        info = jobs.get_job_info(args.job_id)
        console.print(f"{args.job_id}: {info.status.value}" + (f" ({escape(info.message)})" if info.message else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            return 0 if submit.follow(args.address, args.job_id, console) == "SUCCEEDED" else 1
        sys.stdout.write(jobs.get_job_logs(args.job_id))
        return 0
    stopped = jobs.stop_job(args.job_id)
    console.print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0


def cmd_runs(args) -> int:
    from orchestrator.runs import list_runs
    from orchestrator.storage import strict_json

    found = list_runs(args.storage)
    if args.json:
        print(strict_json([r.to_json() for r in found]))
        return 0
    if not found:
        console.print(f"no runs in {args.storage}")
        return 0
    console.print(runs_table(found, args.storage))
    return 0


def runs_table(found, storage: str) -> Table:
    table = Table(title=f"runs in {storage}", title_justify="left")
    for column in ("name", "status", "epochs", "best val acc@1", "test acc@1", "wall", "updated"):
        table.add_column(column, justify="right" if column in ("epochs", "best val acc@1", "test acc@1", "wall") else "left",
                         no_wrap=column in ("status", "wall", "updated"), overflow="fold")
    colour = {"running": "cyan", "completed": "green", "failed": "red", "diverged": "red", "interrupted": "yellow"}

    def number(value, digits=4):
        return "-" if value is None else f"{value:.{digits}f}"

    for r in found:
        if r.kind == "sweep":
            name = f"{r.name} (sweep: {r.trials} trials)"
            best = f"best {r.best_trial}: {r.best_metric} {number(r.best)}" if r.best_trial else "-"
            epochs, val = f"{r.epochs_completed} run", best
        else:
            name, epochs, val = r.name, f"{r.epochs_completed}/{r.epochs or '?'}", number(r.best_val_acc1)
        updated = _local_time(r.updated_at)
        table.add_row(escape(name), f"[{colour.get(r.status, 'white')}]{r.status}[/]", epochs, val,
                      number(r.test_acc1), "-" if r.wall_s is None else f"{r.wall_s:.0f} s", updated)
    return table


def _local_time(iso: str | None) -> str:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M") if iso else "-"


def write_local(path, data: bytes) -> None:
    """write_atomic, with a failure as one line (StorageError, exit 1) instead of a traceback."""
    from orchestrator.storage import StorageError, write_atomic

    try:
        write_atomic(path, data)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_outputs(folder, subdir: str, out: str | None, files: dict[str, bytes]) -> str:
    """Write each file into `out` (a local folder) or else into the run folder's `subdir`; returns where.
    Everything is in memory before the first write, and each file is written atomically."""
    from pathlib import Path

    if out:
        for name, data in files.items():
            write_local(Path(out) / name, data)
        return str(Path(out).resolve())
    for name, data in files.items():
        folder.write_bytes(f"{subdir}/{name}", data)
    return f"{folder.uri}/{subdir}"


def cmd_report(args) -> int:
    from orchestrator.report import run_report, sweep_report
    from orchestrator.runs import folder_kind
    from orchestrator.storage import REPORT_DIR
    from orchestrator.trained import TrainedError, open_run_folder

    folder = open_run_folder(args.run)
    kind = folder_kind(folder)
    if kind is None:
        raise TrainedError(f"{folder.uri} is neither a run folder (spec.yaml) nor a sweep folder (sweep.json)")
    files = sweep_report(folder) if kind == "sweep" else run_report(folder)
    where = write_outputs(folder, REPORT_DIR, args.out, files)
    console.print(f"wrote {where}/index.html and {len(files) - 1} PNG plot(s): "
                  + ", ".join(sorted(n for n in files if n.endswith(".png"))))
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from orchestrator.export import default_name, export_run
    from orchestrator.storage import EXPORT_DIR
    from orchestrator.trained import TrainedError, load_trained

    trained = load_trained(args.run)
    if trained.spec is None:
        raise TrainedError(f"{args.run} is an exported file: export reads a run folder")
    console.print(f"exporting {trained.where} ({trained.spec.model.arch}, {len(trained.class_names)} classes) as {args.format}")
    result = export_run(trained, args.format, args.fold_bn)
    if args.fold_bn:
        console.print(f"folded {result.folded_pairs} conv+BN pairs; max abs logit difference folded vs unfolded on "
                      f"{result.check_count} {result.check_split} images: {result.fold_diff:.2e}")
        table = Table(title="CPU inference, this machine (median ms per batch)", title_justify="left")
        for column in ("batch", "unfolded ms", "folded ms", "speedup"):
            table.add_column(column, justify="right")
        for row in result.speed:
            table.add_row(str(row.batch), f"{row.unfolded_ms:.2f}", f"{row.folded_ms:.2f}", f"{row.speedup:.2f}x")
        console.print(table)
    if result.onnx_diff is not None:
        console.print(f"onnxruntime checked: max abs logit difference ONNX vs torch {result.onnx_diff:.2e}")
    elif args.format == "onnx":
        console.print("[yellow]note:[/yellow] onnxruntime is not installed: the ONNX file was not run "
                      "(pip install 'orchestrator[export]')")
    name = default_name(trained, args.format, args.fold_bn)
    if args.out:
        target = Path(args.out) / name if Path(args.out).is_dir() else Path(args.out)
        write_local(target, result.data)
        where = str(target.resolve())
    else:
        trained.folder.write_bytes(f"{EXPORT_DIR}/{name}", result.data)
        where = f"{trained.folder.uri}/{EXPORT_DIR}/{name}"
    console.print(f"wrote {where} ({len(result.data) / 1e6:.1f} MB)")
    return 0


def cmd_evaluate(args) -> int:
    from orchestrator.evaluation import confusion_png, evaluate_split
    from orchestrator.storage import REPORT_DIR, strict_json
    from orchestrator.trained import load_trained

    trained = load_trained(args.run)
    result = evaluate_split(trained, args.data, args.split)   # an exported file: exit 2, it has no data to read
    png = confusion_png(result, trained.class_names, f"{trained.spec.name}: {result.split} split of {result.source}")
    where = write_outputs(trained.folder, REPORT_DIR, args.out, {f"confusion_{result.split}.png": png})
    if args.json:
        print(strict_json(result.to_json()))
        err_console.print(f"wrote {where}/confusion_{result.split}.png")
        return 0
    console.print(f"{trained.where} on the {result.split} split of {result.source}: acc@1 {result.acc1:.4f}, "
                  f"acc@5 {result.acc5:.4f} ({result.images} images)")
    table = Table(title="per class", title_justify="left")
    for column in ("class", "images", "acc@1"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for i, (name, acc) in enumerate(result.per_class.items()):
        table.add_row(escape(name), str(int(result.confusion[i].sum())), "-" if acc is None else f"{acc:.4f}")
    console.print(table)
    console.print(f"wrote {where}/confusion_{result.split}.png")
    return 0


def cmd_predict(args) -> int:
    from orchestrator.evaluation import predict_files
    from orchestrator.storage import strict_json
    from orchestrator.trained import load_trained

    trained = load_trained(args.run)
    predictions = predict_files(trained, args.images, args.top_k)
    if args.json:
        print(strict_json([p.to_json() for p in predictions]))
        return 0
    table = Table(title=f"predictions of {trained.where}", title_justify="left")
    table.add_column("image")
    table.add_column(f"top {min(args.top_k, len(trained.class_names))} (probability)")
    for p in predictions:
        table.add_row(escape(p.image), ", ".join(f"{escape(c)} {prob:.3f}" for c, prob in p.top))
    console.print(table)
    return 0


def cmd_find_lr(args) -> int:
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from orchestrator.lr_range import range_plot, range_test, table_rows
    from orchestrator.spec import check_references, load_spec
    from orchestrator.storage import strict_json

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


def cmd_pack(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from orchestrator.pack import PackError, check_out, pack
    from orchestrator.storage import strict_json

    if args.shard_size_mb <= 0 or (args.max_side is not None and args.max_side < 8) or (args.workers is not None and args.workers < 1):
        raise PackError("--shard-size-mb must be > 0, --max-side >= 8, --workers >= 1")
    check_out(args.out)
    show = err_console if args.json else console
    reused = []
    with Progress(TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TextColumn("images"), TimeRemainingColumn(),
                  console=show, transient=True) as bar:
        task = bar.add_task("", total=None)

        def on_shard(entry: dict, total: int) -> None:
            bar.update(task, total=total, advance=entry["rows"] + len(entry["skipped"]))
            if entry["reused"]:
                reused.append(entry["file"])

        manifest = pack(args.src, args.out, args.shard_size_mb, args.max_side, args.workers, on_shard)
    for item in manifest["skipped"][:20]:
        show.print(f"[yellow]skipped[/yellow] {escape(item['path'])}: {escape(item['error'])}")
    if len(manifest["skipped"]) > 20:
        show.print(f"... and {len(manifest['skipped']) - 20} more unreadable images (all listed in the manifest)")
    shards = sum(len(entry["shards"]) for entry in manifest["splits"].values())
    show.print(f"packed {escape(args.src)} into {shards} shard(s) in {escape(args.out)} ("
               + ", ".join(f"{name} {entry['images']}" for name, entry in manifest["splits"].items())
               + f" images, {len(manifest['class_names'])} classes; {len(manifest['skipped'])} unreadable skipped"
               + (f"; {len(reused)} shard(s) already packed, kept" if reused else "") + ")")
    show.print(f"train on it: --set data.source=shards:{escape(args.out)}")
    if args.json:
        print(strict_json({"shards": shards, "splits": {k: v["images"] for k, v in manifest["splits"].items()},
                           "classes": len(manifest["class_names"]), "skipped": len(manifest["skipped"]), "reused": len(reused)}))
    return 0


def cmd_up(args) -> int:
    from orchestrator.local_cluster import up

    console.print("starting a local Ray cluster (ray start --head, token auth, loopback only) ...")
    info, started = up(args.workers, args.cpus, args.port, args.dashboard_port)
    nodes = f"head + {info.workers} worker node(s)" if info.workers else "one node"
    console.print(f"{'up' if started else 'already up'}: {nodes}, {info.cpus} CPUs; GCS {info.address}, "
                  f"dashboard and Jobs API {info.dashboard}; Ray's files in {info.folder}")
    console.print("use it: orchestrator train JOB --address auto  (also sweep, submit, jobs); stop it: orchestrator down")
    return 0


def cmd_down(args) -> int:
    from orchestrator.local_cluster import down

    folder, stopped = down()
    console.print(f"stopped the cluster under {folder} ({stopped} processes)" if stopped else f"no cluster running under {folder}")
    return 0


class SubmitUsageError(Exception):
    """A jobs command used wrongly."""


def cmd_bench(args) -> int:
    if args.what == "overhead":
        from orchestrator.bench.overhead import overhead

        overhead(console, epochs=args.epochs or 6, repeats=args.repeats)
    elif args.what == "reliability":
        from orchestrator.bench.reliability import reliability

        reliability(console, runs=args.runs)
    elif args.what == "sweep":
        from orchestrator.bench.sweep import sweep_bench
        from orchestrator.storage import strict_json

        figures = sweep_bench(err_console if args.json else console)
        if args.json:
            print(strict_json({key: figures[key] for key in ("epochs_ratio", "wall_ratio", "best_gap_points")}))
    elif args.what == "ingest":
        from orchestrator.bench.ingest import ingest, print_ingest
        from orchestrator.storage import strict_json

        figures = ingest(err_console if args.json else console, images=args.images or 2000, epochs=args.epochs or 2)
        if args.json:
            print(strict_json({"bound_images_per_s": figures["bound_images_per_s"], "paths": figures["paths"]}))
            err_console.print(f"shards: a loader worker's peak private memory {figures['loader_worker_private_mb']:.0f} MB")
        else:
            print_ingest(console, figures)
    elif args.what == "startup":
        from orchestrator.bench.startup import KEYS, print_startup, startup
        from orchestrator.storage import strict_json

        figures = startup(err_console if args.json else console, repeats=args.repeats)
        if args.json:
            print(strict_json({key: figures[key] for key in KEYS}))
        else:
            print_startup(console, figures)
    elif args.what == "large-batch":
        from orchestrator.bench.large_batch import EPOCHS, WARMUP_EPOCHS, large_batch
        from orchestrator.spec import SpecError

        if args.epochs is not None and args.epochs <= WARMUP_EPOCHS:
            raise SpecError([f"--epochs: {args.epochs}; large-batch warms up over {WARMUP_EPOCHS:g} epoch(s), "
                             f"so give at least {WARMUP_EPOCHS + 1:g}"])
        large_batch(err_console if args.json else console, seeds=args.seeds, epochs=args.epochs or EPOCHS,
                    as_json=args.json, plot=args.plot, images=args.images or 10_240)
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
    p = job_command("train", "train the job: Ray Train DDP workers, or --local in this process")
    p.add_argument("--local", action="store_true", help="run the same loop in this process (world size 1, no Ray)")
    p.add_argument("--address", help="Ray cluster to run on: auto (the cluster `orchestrator up` started, else Ray's auto), "
                                     "HOST:PORT, ray://HOST:10001; default: start a local Ray")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs instead of writing them to the run folder")
    p.add_argument("--insecure", action="store_true", help="allow plain http (or, with a token, Ray's gRPC without TLS) to another machine; says what it risks")
    p.set_defaults(func=cmd_train)
    p = job_command("sweep", "ASHA sweep over the job's sweep.space with Ray Tune; leaderboard, results.parquet, best.yaml")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--address", help="Ray cluster to run on (auto: the one `orchestrator up` started); default: start a local Ray")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    p.add_argument("--insecure", action="store_true", help="allow plain http (or, with a token, Ray's gRPC without TLS) to another machine; says what it risks")
    p.set_defaults(func=cmd_sweep)
    p = job_command("submit", "validate the job here, then run it on a Ray cluster through the Jobs API")
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (auto: `orchestrator up`'s)")
    p.add_argument("--follow", action="store_true", help="stream the logs; exit 0 only if the job succeeds")
    p.add_argument("--insecure", action="store_true", help="allow plain http (or, with a token, Ray's gRPC without TLS) to another machine; says what it risks")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="job id (status, logs, stop)")
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (auto: `orchestrator up`'s)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.add_argument("--insecure", action="store_true", help="allow plain http (or, with a token, Ray's gRPC without TLS) to another machine; says what it risks")
    p.set_defaults(func=cmd_jobs)
    p = sub.add_parser("runs", help="one row per run and sweep folder in a storage: status, epochs, accuracy, time")
    p.add_argument("storage", nargs="?", default="./runs", help="run.storage to list (path or URI; default ./runs)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("report", help="PNG plots and one self-contained HTML page of a run or a sweep")
    p.add_argument("run", metavar="RUN_OR_SWEEP", help="run or sweep folder (path or URI)")
    p.add_argument("--out", help="local folder to write to (default: the run folder's report/)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("export", help="the run's best weights as ONNX, a torch.export program or safetensors")
    p.add_argument("run", help="run folder (path or URI)")
    p.add_argument("--format", choices=["onnx", "pt2", "safetensors"], default="onnx", help="file format (default onnx)")
    p.add_argument("--fold-bn", action="store_true", help="fold every conv+BatchNorm pair, check it on the run's images, time it")
    p.add_argument("--out", help="file to write (default: the run folder's export/NAME[_folded].FORMAT)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("evaluate", help="acc@1/@5, per-class accuracy and a confusion matrix of a run's model on a split")
    p.add_argument("run", help="run folder (path or URI)")
    p.add_argument("--data", metavar="SOURCE", help="another data.source with the run's classes (default: the run's data)")
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.add_argument("--json", action="store_true", help='print {"acc1", "acc5", "per_class", "images"}')
    p.add_argument("--out", help="local folder for the confusion matrix PNG (default: the run folder's report/)")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("predict", help="classify image files with a run's model (or an exported .safetensors/.onnx)")
    p.add_argument("run", help="run folder, or a file written by orchestrator export")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help='print [{"image", "top": [{"class", "prob"}]}]')
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("up", help="start a warm local Ray cluster (token auth, loopback) for --address auto")
    p.add_argument("--workers", type=int, default=0,
                   help="worker nodes besides the head (default 0: one node does the work; N: a head with no CPUs + N nodes)")
    p.add_argument("--cpus", type=int, default=None, help="CPUs for Ray to schedule, all nodes together (default: all)")
    p.add_argument("--port", type=int, default=6380, help="GCS port on 127.0.0.1 (default 6380; a free one if taken)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and Jobs API port (default 8265; a free one if taken)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the cluster `orchestrator up` started (nothing else)")
    p.set_defaults(func=cmd_down)
    p = job_command("find-lr", "LR range test on one process at the job's global batch; suggests optim.base_lr")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of the exponential ramp (default 100)")
    p.add_argument("--start-lr", type=float, default=1e-6, help="LR at the first step (default 1e-6)")
    p.add_argument("--end-lr", type=float, default=10.0, help="LR at the last step (default 10)")
    p.add_argument("--out", help="PNG to write (default ./find_lr_NAME.png)")
    p.add_argument("--json", action="store_true",
                   help='print {"suggested_lr", "suggested_base_lr", "min_loss_lr", "global_batch_size", ..., "points"}')
    p.set_defaults(func=cmd_find_lr)
    p = sub.add_parser("pack", help="pack an ImageFolder tree into Parquet shards + manifest.json (data.source: shards:OUT)")
    p.add_argument("src", help="folder with train/ (val/, test/) of class folders, or the class folders themselves")
    p.add_argument("out", help="folder or URI (s3://, gs://, file://) to write the shards and manifest to")
    p.add_argument("--shard-size-mb", type=float, default=256, help="about this many MB of images per shard (default 256)")
    p.add_argument("--max-side", type=int, default=None, help="re-encode images whose longer side exceeds PX (JPEG); default: keep bytes")
    p.add_argument("--workers", type=int, default=None, help="processes packing shards (default: all cores)")
    p.add_argument("--json", action="store_true", help='print {"shards", "splits", "classes", "skipped", "reused"}')
    p.set_defaults(func=cmd_pack)
    p = sub.add_parser("bench", help="benchmarks that print their figures as ratios to a baseline measured in the same run")
    p.add_argument("what", choices=["overhead", "reliability", "sweep", "large-batch", "startup", "ingest"],
                   help="overhead: Ray Train and --local vs a plain PyTorch loop, per epoch and at start-up; "
                        "reliability: kill a worker mid-run R times, count completed runs, epochs lost or repeated; "
                        "sweep: the same 16 configurations under ASHA and at full budget; "
                        "large-batch: a miniature of Goyal et al.'s table, batch B0 to 64 x B0 with linear scaling, warmup, LARS; "
                        "startup: seconds to the first step of a plain script, --local, and bare TorchTrainer vs ours on a new "
                        "and on a warm Ray; "
                        "ingest: images/s that imagefolder, shards and Ray Data deliver to a loop vs decode + augment alone")
    p.add_argument("--runs", type=int, default=3, help="reliability: runs with a killed worker")
    p.add_argument("--epochs", type=int, default=None, help="epochs per measured run (overhead: 6, the first left out "
                                                                  "of the median; large-batch: 8; ingest: 2 passes)")
    p.add_argument("--seeds", type=int, default=2, help="large-batch: seeds per row")
    p.add_argument("--images", type=int, default=None, help="large-batch: training images (default 10,240; val a tenth, "
                                                                 "test a fifth); ingest: generated JPEGs (default 2,000)")
    p.add_argument("--json", action="store_true", help='print the figures as JSON (progress goes to stderr): large-batch '
                   '{"rows": [...]}; startup {"plain_s", "local_s", "bare_fresh_s", "ours_fresh_s", "bare_warm_s", "ours_warm_s"}; '
                   'sweep {"epochs_ratio", "wall_ratio", "best_gap_points"}; ingest {"bound_images_per_s", "paths": '
                   '{"imagefolder", "shards", "ray_data"}}')
    p.add_argument("--plot", default="large_batch.png", help="large-batch: where to write the error-vs-batch PNG")
    p.add_argument("--repeats", type=int, default=2, help="overhead, startup: start-up rounds, cold and warm (the best is kept)")
    p.set_defaults(func=cmd_bench)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, schedulers and Kubernetes send): handled as Ctrl-C is, exit 143."""


_received_sigterm = threading.Event()
"""set by the SIGTERM handler: the exit code says SIGTERM (143) even when a library (Ray's get, say)
caught the Terminated it raised and raised a KeyboardInterrupt of its own"""


def _raise_terminated(signum, frame) -> None:
    _received_sigterm.set()
    raise Terminated()


def _interrupted_exit(exc: BaseException) -> int:
    """143 after SIGTERM, 130 after Ctrl-C."""
    seen = exc
    while seen is not None:
        if isinstance(seen, Terminated):
            return 143
        seen = seen.__context__
    return 143 if _received_sigterm.is_set() else 130


def main(argv: list[str] | None = None) -> int:
    from orchestrator.launch import RunInterrupted
    from orchestrator.storage import StorageError
    from orchestrator.sweep import SweepInterrupted

    args = build_parser().parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    _received_sigterm.clear()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        return args.func(args)
    except _user_error_types() as exc:
        return _report_user_error(exc)
    except (RunInterrupted, SweepInterrupted) as exc:
        err_console.print(str(exc), markup=False)
        return _interrupted_exit(exc)
    except KeyboardInterrupt as exc:
        err_console.print("terminated (SIGTERM)" if _interrupted_exit(exc) == 143 else "interrupted")
        return _interrupted_exit(exc)
    except StorageError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 1
    except Exception as exc:
        if not type(exc).__module__.startswith("ray."):
            raise
        # a worker's error: Ray's message carries the worker's traceback; show it whole
        err_console.print(f"[red]error:[/red] training failed on Ray ({type(exc).__name__}):", markup=True)
        err_console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        return 1
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
