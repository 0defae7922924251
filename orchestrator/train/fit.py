"""One worker's whole run: data, model, optimizer, resume, epochs, checkpoints, metrics, summary.

Imports no Ray: `train.run.WorkerEnv` carries what differs between a Ray Train worker
(`cluster.worker`) and the in-process `--local` run (`cluster.launch`). The plan arrives
made: a worker never re-plans. Side effects on rank 0, collectives on every rank. Randomness is
re-seeded from (seed, epoch, rank) at every epoch, so a resumed run draws the same augmentations and
batches as an unbroken one.
"""

from __future__ import annotations

import gc
import math
import time

import numpy as np
import torch
from torch import nn

from orchestrator.config.jobfile import spec_to_yaml
from orchestrator.config.plan import Plan, PlanError
from orchestrator.config.spec import JobSpec
from orchestrator.data.device_decode import DeviceDecoded
from orchestrator.data.loaders import (
    EVAL_BATCH_SIZE,
    StreamedDataset,
    eval_loader,
    loader_workers,
    make_dataset,
    start_epoch,
    train_loader,
)
from orchestrator.data.sources import load_splits
from orchestrator.data.splits import Splits
from orchestrator.store.metrics import best_epochs, early_stop, epoch_row, improved
from orchestrator.store.storage import (
    BAD_IMAGES_FILE,
    BEST_CHECKPOINT,
    METRICS_FILE,
    PLAN_FILE,
    SPEC_FILE,
    STEP_CHECKPOINT,
    STEP_DIR,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    RunFolder,
)
from orchestrator.train import checkpoint as ckpt
from orchestrator.train import progress
from orchestrator.train.compiled import compile_in_place
from orchestrator.train.eventlog import EventLog
from orchestrator.train.loop import (
    DivergenceError,
    Tally,
    Trainee,
    evaluate,
    train_one_epoch,
)
from orchestrator.train.models import (
    BuiltModel,
    build_model,
    frozen_norm_layers,
    set_trainable,
    trainability_rows,
)
from orchestrator.train.optim import rebuild_keeping_state, switch_to_sgd
from orchestrator.train.pace import pick_loader_workers, share_cpus, stall_line
from orchestrator.train.resolve import resolve_num_classes
from orchestrator.train.resume import find_resume_point, restore_trainee
from orchestrator.train.run import Run, WorkerEnv, build_trainee, seed_epoch
from orchestrator.train.step_checkpoint import mid_epoch_saver
from orchestrator.train.tracking import finish_tracking, open_tracking


def fit(spec: JobSpec, plan: Plan, env: WorkerEnv, splits: Splits | None = None) -> dict:
    """Train per spec and plan; returns the summary (also written to summary.json by rank 0).

    `splits`: the data as the driver read it for the plan (in-process runs), else read here."""
    folder = RunFolder(spec.run.storage, spec.name)
    if spec.run.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(spec.seed)   # the same initial weights on every rank
    splits = splits if splits is not None else load_splits(spec.data, spec.seed)
    if len(splits.train) != plan.num_train_samples:
        raise PlanError(f"data: the workers read {len(splits.train)} training images, the plan was made for "
                        f"{plan.num_train_samples}; set data.num_train_samples: {len(splits.train)} (or drop it)")
    num_classes = resolve_num_classes(spec, splits)
    built = build_model(spec.model, num_classes, spec.data.image_size, splits.class_names)
    _announce(env, splits, built, spec)
    resume_point, skipped = find_resume_point(env.restore, folder)
    for line in skipped:
        env.log(f"warning: {line}")
    run = Run(spec, plan, env, folder, ckpt.TrainingState(), time.perf_counter(), built.unfreeze)
    payload = None
    if resume_point is not None:
        payload, where = resume_point
        ckpt.load_model_state(built.model, payload["model"], where)
        run.state = ckpt.TrainingState.from_payload(payload)
        _note_resize(run, payload)
    trainee = _make_trainee(run, built, payload)
    train_set = make_dataset(splits.train, spec.data, True, "train")
    run.loader_workers = _loader_workers(run, train_set, trainee)
    pinned = env.device.type == "cuda"
    loaders = (env.train_batches or _on_device(train_loader(train_set, spec.data, plan, env.rank, spec.seed, num_classes,
                                                            run.loader_workers, pinned), train_set, run),
               eval_loader(make_dataset(splits.val, spec.data, False, "val"), spec.data, EVAL_BATCH_SIZE, env.rank,
                           env.world_size, run.loader_workers, pinned))
    _start(run, resume_point, splits.bad_images)
    try:
        diverged = _train_epochs(run, trainee, loaders)
    except BaseException as exc:
        if run.tracker:
            run.tracker.fail("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if run.events:
            run.events.close()
    summary = _finish(run, splits, trainee.evaluated, diverged)
    if env.rank == 0:
        folder.write_json(SUMMARY_FILE, summary)
        if run.tracker:
            finish_tracking(run.tracker, folder, summary, splits.class_names)
        env.emit(progress.Summary(summary))
    return summary


def _note_resize(run: Run, payload: dict) -> None:
    """A resume on another number of workers (an elastic run): recorded (summary.json `resizes`) and said in one line."""
    before = Plan.from_dict(payload["plan"]) if payload.get("plan") else None
    if before is None or before.world_size == run.plan.world_size:
        return
    run.state.resizes.append({"epoch": payload["epoch"] + 1, "step": payload["step"], "from": before.world_size,
                              "to": run.plan.world_size})
    run.env.log(f"resized at step {payload['step']}: {before.resize_line(run.plan)}")


def _on_device(loader, train_set, run: Run):
    """The training loader, its encoded batches decoded on the device with data.decode: gpu."""
    if run.spec.data.decode != "gpu":
        return loader
    return DeviceDecoded(loader, train_set.transform, run.env.device, run.spec.data.exif_transpose)


def _loader_workers(run: Run, train_set, trainee: Trainee) -> int:
    """data.loader_workers, or for auto: measured (train/pace.py) for data read by index; a stream's
    order depends on its loader processes, so it takes every CPU but the trainer's (the same on a resume)."""
    spec = run.spec
    workers, why = loader_workers(spec.data, spec.scaling.cpus_per_worker), None
    if workers is None and isinstance(train_set, StreamedDataset):
        workers = int(spec.scaling.cpus_per_worker) - 1
    elif workers is None:
        workers, why = pick_loader_workers(spec, train_set, trainee.model, run.env.device, run.plan.per_worker_batch_size)
    threads = share_cpus(spec.scaling.cpus_per_worker, workers, run.env.device)
    for line in (why, threads):
        if line and run.env.rank == 0:
            run.env.log(line)
    return workers


def _train_epochs(run: Run, trainee: Trainee, loaders) -> str | None:
    """The remaining epochs, each saved; returns the divergence message that stopped them, or None."""
    for epoch in range(run.state.next_epoch, run.plan.epochs):
        if _stopped_early(run) is not None:
            break
        _apply_epoch_changes(run, trainee, epoch)
        try:
            row = _run_epoch(run, trainee, loaders, epoch)
        except DivergenceError as exc:
            return str(exc)
        _save_epoch(run, trainee, row)
        stall = stall_line(row, run.spec, run.loader_workers)
        if stall and run.env.rank == 0:
            run.env.log(stall)
    stopped = _stopped_early(run)
    if stopped is not None and run.env.rank == 0:
        stop = run.spec.schedule.early_stopping
        run.env.log(f"early stopping: {stop.metric} has not improved by more than {stop.min_delta:g} for {stop.patience} "
                    f"epochs (best at epoch {stopped[1] + 1}); stopped after epoch {stopped[0] + 1} of {run.plan.epochs}")
    return None


def _stopped_early(run: Run) -> tuple[int, int] | None:
    """(epoch the run stopped after, epoch of the best metric), 0-based, once schedule.early_stopping says stop."""
    stop = run.spec.schedule.early_stopping
    if stop is None or len(run.state.rows) >= run.plan.epochs:
        return None
    return early_stop(run.state.rows, stop.metric, stop.patience, stop.min_delta)


def _announce(env: WorkerEnv, splits: Splits, built: BuiltModel, spec: JobSpec) -> None:
    """Rank 0 tells the driver about the data notes, the weights report and what trains."""
    for note in splits.notes:
        env.log(note)
    lines = built.report.lines() if built.report else [f"weights: none ({spec.model.arch} from scratch, init {spec.model.head_init})"]
    for line in lines:
        env.log(line)
    if env.rank == 0:
        env.emit(progress.Trainability(trainability_rows(built.model)))


def _start(run: Run, resume_point: tuple[dict, str] | None, bad_images: list[list[str]]) -> None:
    """Every check has passed: from here the run folder changes. Rank 0 writes spec.yaml, plan.json, the
    unreadable images left out (bad_images.txt) and, when resuming, puts the checkpoint's metric rows
    back (no epoch missing, none counted twice)."""
    env = run.env
    env.on_start()
    if resume_point is not None:
        payload, where = resume_point
        done = f"epoch {payload['epoch']} done" if payload["epoch"] >= 0 else "no epoch done"
        inside = f" and {payload['epoch_steps']} steps of epoch {payload['epoch'] + 1}" if payload.get("epoch_steps") else ""
        env.log(f"resumed from {where} ({done}{inside}, step {payload['step']})")
    if env.rank == 0:
        run.folder.write_text(SPEC_FILE, spec_to_yaml(run.spec))
        run.folder.write_json(PLAN_FILE, run.plan.to_dict())
        if bad_images:
            run.folder.write_text(BAD_IMAGES_FILE, "".join(f"{path}\t{reason}\n" for path, reason in bad_images))
        if resume_point is not None:
            run.folder.write_rows(METRICS_FILE, run.state.rows)
        run.events = EventLog(run.folder, run.state.step)
        run.tracker = open_tracking(run.spec, run.folder, run.plan.to_dict(), env.log)
        if run.tracker and resume_point is not None:
            run.tracker.catch_up(run.state.rows)


def _make_trainee(run: Run, built: BuiltModel, payload: dict | None) -> Trainee:
    """Model on its device, optimizer (and SWATS, GradScaler) as they were at the checkpoint, wrapped."""
    spec, model = run.spec, built.model
    frozen = list(built.frozen)
    for at_epoch, names in run.unfreeze:
        if at_epoch <= run.state.next_epoch:   # a resumed run trains what an unbroken one would by now
            set_trainable(model, names, True)
            freed = set(names)
            frozen = [n for n in frozen if n not in freed]
    trainee = build_trainee(spec, run.plan, model, frozen, run.env.device)
    if payload is not None:
        restore_trainee(trainee, payload, spec)
    if compile_in_place(model, spec.model.compile) and run.env.rank == 0:
        run.env.log("model.compile: the forward is compiled in place; the first step pays the compilation")
    trainee.wrapped = run.env.wrap_model(model)
    return trainee


def _apply_epoch_changes(run: Run, trainee: Trainee, epoch: int) -> None:
    """Unfreeze per model.unfreeze(_at_epoch); switch Adam to SGD at optim.switch_to_sgd_at_epoch."""
    spec = run.spec
    for at_epoch, names in run.unfreeze:
        if at_epoch == epoch:
            _unfreeze(run, trainee, names, epoch)
    if trainee.tracking_swats and epoch == spec.optim.switch_to_sgd_at_epoch:
        multiplier_now = run.step_settings().lr_multiplier(run.state.step)
        trainee.optimizer = switch_to_sgd(trainee.optimizer, trainee.swats, spec.optim, multiplier_now)
        trainee.optimizer_name = "sgd"
        run.env.log(f"epoch {epoch}: SWATS switched {spec.optim.name} to SGD at lr "
                    + ", ".join(f"{g['name']} {g['lr']:.4g}" for g in trainee.optimizer.param_groups))


def _unfreeze(run: Run, trainee: Trainee, names: list[str], epoch: int) -> None:
    """These parameters train from now: the optimizer is rebuilt (keeping its state), the model re-wrapped."""
    set_trainable(trainee.model, names, True)
    freed = set(names)
    trainee.frozen = [n for n in trainee.frozen if n not in freed]
    trainee.eval_modules = [] if run.spec.model.train_bn else frozen_norm_layers(trainee.model)
    trainee.optimizer = rebuild_keeping_state(trainee.optimizer, trainee.model, run.plan.param_groups, run.spec.optim)
    trainee.wrapped = None   # DDP's reducer hooks go with it, before a new DDP registers its own
    gc.collect()
    trainee.wrapped = run.env.wrap_model(trainee.model)
    run.env.log(f"epoch {epoch}: unfroze {len(names)} parameter tensors ({len(trainee.frozen)} still frozen)")


def _run_epoch(run: Run, trainee: Trainee, loaders, epoch: int) -> dict:
    """Train and validate one epoch (from a mid-epoch checkpoint's step when one was resumed); returns its
    metric row (and advances state.step)."""
    env, plan, state = run.env, run.plan, run.state
    train, val = loaders
    skip = state.epoch_steps
    seeded = seed_epoch(run.spec.seed, epoch, env.rank)
    if skip and state.rng_by_rank and env.rank < len(state.rng_by_rank):   # (a resume on more workers: seeded)
        ckpt.set_rng_state(state.rng_by_rank[env.rank])
    if callable(train):   # the framework's batches (Ray Data): no mid-epoch skip (the spec refuses it)
        train = train(epoch)
    else:
        train.generator.manual_seed(seeded)
        start_epoch(train, epoch, skip * plan.grad_accum_steps)
    start = progress.EpochStart(epoch, plan.epochs, plan.steps_per_epoch)
    if env.rank == 0:
        env.emit(start)
    settings = run.step_settings()
    first_step = state.step - skip
    tally = Tally(**state.tally) if skip and state.tally else Tally()
    on_step = _on_step(run, start, trainee, mid_epoch_saver(run, trainee, first_step, tally))
    stats = train_one_epoch(trainee, train, settings, epoch, first_step, on_step, skip, tally)
    val_stats = evaluate(trainee.evaluated, val, env.device, settings.amp, settings.channels_last)
    state.step, state.epoch_steps, state.tally, state.rng_by_rank = first_step + plan.steps_per_epoch, 0, None, None
    if val_stats.images and not math.isfinite(val_stats.loss):   # every rank sees the all-reduced loss
        raise DivergenceError(epoch, state.step, val_stats.loss, what="validation loss")
    lrs = {g.name: None for g in plan.param_groups}   # every group has its column; null while it has nothing training
    lrs.update({group["name"]: lr for group, lr in zip(trainee.optimizer.param_groups, stats.last_lrs)})
    return epoch_row(epoch, state.step, lrs, stats, val_stats, state.wall_s + time.perf_counter() - run.started,
                     plan.world_size)


def _on_step(run: Run, start: progress.EpochStart, trainee: Trainee, save=None):
    """Progress events and TensorBoard scalars on rank 0, the mid-epoch checkpoint (`save`) and the env's
    step hook on every rank, as one on_step callback."""
    env = run.env
    reporter = progress.step_reporter(env.emit, start, run.state.step, run.plan.global_batch_size) if env.rank == 0 else None
    names = [group["name"] for group in trainee.optimizer.param_groups]

    def on_step(step: int, loss, lrs: list[float]) -> None:
        shown = reporter(step, loss, lrs) if reporter else None
        if run.events:   # the loss as the progress line read it: no host wait on the other steps
            run.events.step(step, shown, dict(zip(names, lrs)))
        if run.tracker and shown is not None:
            run.tracker.step(step, shown, dict(zip(names, lrs)))
        if save:
            save(step)
        if env.step_hook:
            env.step_hook(step)

    return on_step


def _save_epoch(run: Run, trainee: Trainee, row: dict) -> None:
    """Record the row, then rank 0 writes the checkpoint (and the best), every rank reports, rank 0 writes metrics."""
    env, state = run.env, run.state
    state.rows.append(row)
    state.metric_history.append(row[run.spec.schedule.plateau_metric])
    is_best = improved(state.best, row)
    if is_best:
        state.best = {"epoch": row["epoch"], "val_acc1": row["val_acc1"], "val_loss": row["val_loss"]}
    data = None
    if env.rank == 0:
        data = ckpt.encode(trainee, state, run.spec, run.plan)
        if is_best:
            run.folder.write_bytes(BEST_CHECKPOINT, data)
        if run.spec.run.keep_best > 1:
            run.folder.keep_best_checkpoints(row["epoch"], data, best_epochs(state.rows, run.spec.run.keep_best))
    env.report(row, data, row["epoch"])
    if env.rank == 0:
        if run.folder.exists(STEP_CHECKPOINT):
            run.folder.delete_dir(STEP_DIR)   # the epoch checkpoint supersedes it
        run.folder.write_rows(METRICS_FILE, state.rows)
        run.events.epoch(row)
        if run.tracker:
            run.tracker.epoch(row)
        env.emit(progress.EpochEnd(row, is_best))
    env.on_epoch_end(row)


def _finish(run: Run, splits: Splits, model: nn.Module, diverged: str | None) -> dict:
    """Evaluate the best checkpoint on the test split (all ranks) and build the summary.

    `model`: the evaluated model (the EMA when model.ema_decay is set), loaded with the best checkpoint's
    evaluated weights, then written to model.safetensors.

    Evaluation runs on the unwrapped model: DDP's forward may broadcast buffers, and shards of
    unequal length would leave one rank waiting.
    """
    spec, state = run.spec, run.state
    summary = {
        "name": spec.name, "status": "diverged" if diverged else "completed", "message": diverged,
        "epochs_completed": len(state.rows), "epochs": spec.schedule.epochs,
        "wall_s": state.rows[-1]["wall_s"] if state.rows else state.wall_s + time.perf_counter() - run.started,
        "best_epoch": state.best["epoch"] if state.best else None,
        "best_val_acc1": state.best["val_acc1"] if state.best else None,
        "test_acc1": None, "test_acc5": None, "test_loss": None, "test_images": 0,
        "test_balanced_acc": None, "test_macro_f1": None,
        "images_per_s_mean": float(np.mean([r["images_per_s"] for r in state.rows])) if state.rows else None,
        "run_folder": run.folder.uri,
        "stopped_early_at_epoch": stopped[0] + 1 if (stopped := _stopped_early(run)) else None,
        "resizes": state.resizes,
    }
    if diverged or not state.rows:
        return summary
    if run.folder.exists(BEST_CHECKPOINT):
        ckpt.load_model_state(model, ckpt.evaluated_weights(ckpt.read(run.folder, BEST_CHECKPOINT)), BEST_CHECKPOINT)
    if splits.test is not None:
        test_set = make_dataset(splits.test, spec.data, False, "test")
        test = evaluate(model, eval_loader(test_set, spec.data, EVAL_BATCH_SIZE, run.env.rank, run.env.world_size,
                                           run.loader_workers),
                        run.env.device, spec.scaling.amp, spec.scaling.channels_last)
        summary.update(test_acc1=test.acc1, test_acc5=test.acc5, test_loss=test.loss, test_images=test.images,
                       test_balanced_acc=test.balanced_acc, test_macro_f1=test.macro_f1)
    if run.env.rank == 0:
        _write_weights(run, model, splits, summary["best_epoch"])
    return summary


def _write_weights(run: Run, model: nn.Module, splits: Splits, best_epoch: int | None) -> None:
    from safetensors.torch import save

    weights = {k: v.contiguous() for k, v in ckpt.cpu_state_dict(model).items()}
    metadata = {"arch": run.spec.model.arch, "epoch": str(best_epoch), "classes": ",".join(splits.class_names)}
    run.folder.write_bytes(WEIGHTS_FILE, save(weights, metadata=metadata))
