"""One worker's whole run: data, model, optimizer, resume, epochs, checkpoints, metrics, summary.

Imports no Ray: `WorkerEnv` carries what differs between a Ray Train worker (`worker.py`) and the
in-process `--local` run: rank, world size, device, how to wrap the model (DDP or not), how to
report an epoch (with its checkpoint) and where to resume from. Side effects on rank 0,
collectives on every rank. Randomness is re-seeded from (seed, epoch, rank) at every epoch, so a
resumed run draws the same augmentations and batches as an unbroken one.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from orchestrator import checkpoint as ckpt
from orchestrator.data import eval_loader, load_splits, make_dataset, train_loader
from orchestrator.loop import DivergenceError, evaluate, train_one_epoch
from orchestrator.models import build_model, set_trainable, trainability_rows
from orchestrator.optim import SwatsTracker, build_optimizer, rebuild_keeping_state, switch_to_sgd
from orchestrator.plan import Plan, make_plan
from orchestrator.prepare import resolve_num_classes
from orchestrator.schedule import lr_multiplier
from orchestrator.spec import JobSpec
from orchestrator.storage import BEST_DIR, CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE, WEIGHTS_FILE, RunFolder

EVAL_BATCH_SIZE = 256


@dataclass
class WorkerEnv:
    rank: int
    world_size: int
    device: torch.device
    wrap_model: Callable[[nn.Module], nn.Module]
    """DDP for Ray workers, identity locally; called again after unfreezing"""
    report: Callable[[dict, bytes | None, int], None]
    """(metric row, checkpoint bytes on rank 0 else None, epoch): every rank, once per epoch"""
    restore: Callable[[], tuple[bytes, str] | None]
    """(checkpoint bytes, where) the framework hands back on a restart, or None"""
    emit: Callable[[dict], None] = lambda event: None
    """progress events to the driver (called on rank 0 only)"""
    step_hook: Callable[[int], None] | None = None
    """called on every rank after each optimizer step with the step number (fault injection)"""


@dataclass
class RunState:
    """What a checkpoint carries besides weights and optimizer state."""

    next_epoch: int = 0
    step: int = 0
    metric_history: list[float] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    best: dict | None = None
    wall_s: float = 0.0


def seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Seed torch, numpy and random from (seed, epoch, rank); returns the seed used."""
    value = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


def _log(env: WorkerEnv, text: str) -> None:
    if env.rank == 0:
        env.emit({"type": "log", "text": text})


def _restore(env: WorkerEnv, folder: RunFolder) -> tuple[dict, str] | None:
    """The checkpoint to resume from: the framework's, else the latest epoch checkpoint in the run folder."""
    found = env.restore()
    if found is None:
        latest = folder.latest_checkpoint()
        if latest is None:
            return None
        found = folder.read_bytes(latest), f"{folder.uri}/{latest}"
    data, where = found
    return ckpt.from_bytes(data, where), where


def _row(epoch: int, step: int, optimizer, stats, val, train_s: float, val_s: float, wall_s: float) -> dict:
    row = {"epoch": epoch, "step": step}
    for group, lr in zip(optimizer.param_groups, stats.last_lrs):
        row[f"lr/{group['name']}"] = lr
    row.update({
        "train_loss": stats.train_loss, "val_loss": val.loss, "val_acc1": val.acc1, "val_acc5": val.acc5,
        "images_per_s": stats.images / train_s if train_s > 0 else 0.0,
        "train_s": train_s, "val_s": val_s, "epoch_s": train_s + val_s, "wall_s": wall_s,
    })
    return row


def _improved(best: dict | None, row: dict) -> bool:
    if best is None:
        return True
    value, old = row["val_acc1"], best["val_acc1"]
    return value > old or (value == old and row["val_loss"] < best["val_loss"])


@dataclass
class Trainee:
    """What trains and how: the model (unwrapped and as the framework wraps it) and its optimizer."""

    model: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    """the optimizer in use now (SWATS changes adam/adamw to sgd)"""
    swats: SwatsTracker | None
    scaler: torch.amp.GradScaler | None
    frozen: list[str]
    """parameter names frozen until model.unfreeze_at_epoch"""


def fit(spec: JobSpec, plan: Plan, env: WorkerEnv) -> dict:
    """Train per spec and plan; returns the summary (also written to summary.json by rank 0)."""
    started = time.perf_counter()
    folder = RunFolder(spec.run.storage, spec.name)
    if spec.run.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(spec.seed)   # the same initial weights on every rank
    splits = load_splits(spec.data, spec.seed)
    if len(splits.train) != plan.num_train_samples:
        _log(env, f"the data has {len(splits.train)} training images, the plan assumed {plan.num_train_samples}: re-planned")
        plan = make_plan(spec, len(splits.train), env.world_size)
    built = build_model(spec.model, resolve_num_classes(spec, splits), spec.data.image_size)
    _announce(env, splits, built, spec)
    state, payload = _restore_state(env, folder, built.model)
    trainee = _make_trainee(spec, plan, env, built, state, payload)
    loader = train_loader(make_dataset(splits.train, spec.data, True, "train"), spec.data, plan.per_worker_batch_size,
                          env.rank, env.world_size, spec.seed, plan.grad_accum_steps)
    val_loader = eval_loader(make_dataset(splits.val, spec.data, False, "val"), spec.data, EVAL_BATCH_SIZE, env.rank, env.world_size)

    diverged = None
    for epoch in range(state.next_epoch, plan.epochs):
        _apply_epoch_changes(spec, plan, env, trainee, state, epoch)
        try:
            row = _run_epoch(spec, plan, env, trainee, state, epoch, loader, val_loader, started)
        except DivergenceError as exc:
            diverged = str(exc)
            break
        _save_epoch(spec, plan, env, folder, trainee, state, row, epoch)

    wall_s = state.rows[-1]["wall_s"] if state.rows else state.wall_s + time.perf_counter() - started
    summary = _finish(spec, splits, trainee.model, env, folder, state, wall_s, diverged)
    if env.rank == 0:
        folder.write_json(SUMMARY_FILE, summary)
        env.emit({"type": "summary", "summary": summary})
    return summary


def _announce(env: WorkerEnv, splits, built, spec: JobSpec) -> None:
    """Rank 0 tells the driver about the data notes, the weights report and what trains."""
    if env.rank != 0:
        return
    for note in splits.notes:
        _log(env, note)
    lines = built.report.lines() if built.report else [f"weights: none ({spec.model.arch} from scratch, init {spec.model.head_init})"]
    for line in lines:
        _log(env, line)
    env.emit({"type": "trainability", "rows": trainability_rows(built.model)})


def _restore_state(env: WorkerEnv, folder: RunFolder, model: nn.Module) -> tuple[RunState, dict | None]:
    """Load the checkpoint to resume from into the model; (run state, checkpoint payload or None)."""
    restored = _restore(env, folder)
    if restored is None:
        return RunState(), None
    payload, where = restored
    ckpt.load_model_state(model, payload["model"], where)
    _log(env, f"resumed from {where} (epoch {payload['epoch']} done, step {payload['step']})")
    state = RunState(payload["epoch"] + 1, payload["step"], list(payload["metric_history"]), list(payload["rows"]),
                     payload["best"], payload["wall_s"])
    if env.rank == 0:   # the metric rows are the checkpoint's: no epoch missing, none counted twice
        folder.write_rows(METRICS_FILE, state.rows)
    return state, payload


def _make_trainee(spec: JobSpec, plan: Plan, env: WorkerEnv, built, state: RunState, payload: dict | None) -> Trainee:
    """Model on its device, optimizer (and SWATS, GradScaler) as they were at the checkpoint, wrapped."""
    model = built.model
    unfreeze_at = spec.model.unfreeze_at_epoch
    if built.frozen and unfreeze_at is not None and state.next_epoch >= unfreeze_at:
        set_trainable(model, built.frozen, True)
    model.to(env.device)
    if spec.scaling.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, spec, plan.scaled_lr)
    swats = SwatsTracker(spec.optim.betas[1]) if spec.optim.switch_to_sgd_at_epoch is not None else None
    scaler = torch.amp.GradScaler("cuda") if spec.scaling.amp == "fp16" else None
    optimizer_name = spec.optim.name
    if payload is not None:
        if swats and payload.get("swats"):
            swats.load_state_dict(payload["swats"])
        switched = payload["optimizer_name"] != optimizer_name   # SWATS switched before the checkpoint
        if switched:
            optimizer, optimizer_name = switch_to_sgd(optimizer, swats, spec, 1.0), payload["optimizer_name"]
        load_optimizer_state(optimizer, payload["optimizer"], keep_base_lr=switched)
        if scaler and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
    return Trainee(model, env.wrap_model(model), optimizer, optimizer_name, swats, scaler, built.frozen)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, keep_base_lr: bool) -> None:
    """Per-parameter state (momentum, Adam moments) from the checkpoint; hyperparameters from the job.

    So a run resumed with a lower LR or another weight decay (say after a divergence) uses them.
    `keep_base_lr`: keep the checkpoint's base_lr (SWATS estimated it at the switch).
    """
    from_job = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except ValueError as exc:
        raise ckpt.CheckpointError(f"the checkpoint's optimizer state does not fit this job's parameter groups ({exc}); "
                                   "did optim.param_groups, optim.name or model.freeze change?") from None
    for group, settings in zip(optimizer.param_groups, from_job):
        saved_base_lr = group["base_lr"]
        group.update(settings)
        if keep_base_lr:
            group["base_lr"] = saved_base_lr


def _multiplier(spec: JobSpec, plan: Plan, state: RunState):
    def multiplier(step: int) -> float:
        return lr_multiplier(step, spec.schedule, plan.steps_per_epoch, plan.warmup_steps, plan.total_steps,
                             plan.scaled_lr, state.metric_history)
    return multiplier


def _apply_epoch_changes(spec: JobSpec, plan: Plan, env: WorkerEnv, trainee: Trainee, state: RunState, epoch: int) -> None:
    """Unfreeze at model.unfreeze_at_epoch; switch Adam to SGD at optim.switch_to_sgd_at_epoch."""
    if trainee.frozen and epoch == spec.model.unfreeze_at_epoch:
        set_trainable(trainee.model, trainee.frozen, True)
        trainee.optimizer = rebuild_keeping_state(trainee.optimizer, trainee.model, spec, plan.scaled_lr)
        trainee.wrapped = None   # DDP's reducer hooks go with it, before a new DDP registers its own
        gc.collect()
        trainee.wrapped = env.wrap_model(trainee.model)
        _log(env, f"epoch {epoch}: unfroze {len(trainee.frozen)} parameter tensors")
    if trainee.swats is not None and epoch == spec.optim.switch_to_sgd_at_epoch and trainee.optimizer_name != "sgd":
        trainee.optimizer = switch_to_sgd(trainee.optimizer, trainee.swats, spec, _multiplier(spec, plan, state)(state.step))
        trainee.optimizer_name = "sgd"
        _log(env, f"epoch {epoch}: SWATS switched {spec.optim.name} to SGD at lr "
                  + ", ".join(f"{g['name']} {g['lr']:.4g}" for g in trainee.optimizer.param_groups))


def _run_epoch(spec: JobSpec, plan: Plan, env: WorkerEnv, trainee: Trainee, state: RunState, epoch: int,
               loader, val_loader, started: float) -> dict:
    """Train and validate one epoch; returns its metric row (and advances state.step)."""
    loader.generator.manual_seed(seed_epoch(spec.seed, epoch, env.rank))
    loader.sampler.set_epoch(epoch)
    if env.rank == 0:
        env.emit({"type": "epoch_start", "epoch": epoch, "epochs": plan.epochs, "steps": plan.steps_per_epoch})
    stats = train_one_epoch(
        trainee.wrapped, loader, trainee.optimizer, epoch=epoch, first_step=state.step, steps=plan.steps_per_epoch,
        grad_accum_steps=plan.grad_accum_steps, lr_multiplier=_multiplier(spec, plan, state), device=env.device,
        amp=spec.scaling.amp, channels_last=spec.scaling.channels_last, grad_clip_norm=spec.optim.grad_clip_norm,
        scaler=trainee.scaler, swats=trainee.swats if trainee.optimizer_name != "sgd" else None,
        on_step=_step_callback(env, epoch, state.step, plan))
    val_started = time.perf_counter()
    val = evaluate(trainee.model, val_loader, env.device, spec.scaling.amp, spec.scaling.channels_last)
    val_s = time.perf_counter() - val_started
    state.step += plan.steps_per_epoch
    return _row(epoch, state.step, trainee.optimizer, stats, val, stats.seconds, val_s,
                state.wall_s + time.perf_counter() - started)


def _save_epoch(spec: JobSpec, plan: Plan, env: WorkerEnv, folder: RunFolder, trainee: Trainee, state: RunState,
                row: dict, epoch: int) -> None:
    """Record the row, then rank 0 writes the checkpoint (and the best), every rank reports, rank 0 writes metrics."""
    state.rows.append(row)
    state.metric_history.append(row[spec.schedule.plateau_metric])
    is_best = _improved(state.best, row)
    if is_best:
        state.best = {"epoch": epoch, "val_acc1": row["val_acc1"], "val_loss": row["val_loss"]}
    data = None
    if env.rank == 0:
        data = ckpt.to_bytes({
            "version": ckpt.CHECKPOINT_VERSION, "model": ckpt.cpu_state_dict(trainee.model),
            "optimizer": trainee.optimizer.state_dict(), "optimizer_name": trainee.optimizer_name,
            "swats": trainee.swats.state_dict() if trainee.swats else None,
            "scaler": trainee.scaler.state_dict() if trainee.scaler else None,
            "epoch": epoch, "step": state.step, "metric_history": state.metric_history, "rows": state.rows,
            "best": state.best, "wall_s": row["wall_s"], "rng": ckpt.rng_state(),
            "spec": spec.to_dict(), "plan": plan.to_dict(),
        })
        if is_best:
            folder.write_bytes(f"{BEST_DIR}/{CHECKPOINT_FILE}", data)
    env.report(row, data, epoch)
    if env.rank == 0:
        folder.write_rows(METRICS_FILE, state.rows)
        env.emit({"type": "epoch_end", "row": row, "best": is_best})


STEP_EVENT_INTERVAL_S = 0.5


def _step_callback(env: WorkerEnv, epoch: int, first_step: int, plan: Plan):
    """Progress events on rank 0 and the env's step hook on every rank, as one on_step callback."""
    reporter = _step_reporter(env, epoch, first_step, plan) if env.rank == 0 else None
    if env.step_hook is None:
        return reporter

    def on_step(step: int, loss: float, lrs: list[float]) -> None:
        if reporter:
            reporter(step, loss, lrs)
        env.step_hook(step)

    return on_step


def _step_reporter(env: WorkerEnv, epoch: int, first_step: int, plan: Plan):
    """on_step callback emitting at most one step event per STEP_EVENT_INTERVAL_S (and the first and last)."""
    last = {"time": time.perf_counter(), "done": 0}

    def on_step(step: int, loss: float, lrs: list[float]) -> None:
        done = step - first_step + 1
        now = time.perf_counter()
        if done not in (1, plan.steps_per_epoch) and now - last["time"] < STEP_EVENT_INTERVAL_S:
            return
        images_per_s = (done - last["done"]) * plan.global_batch_size / max(now - last["time"], 1e-9)
        last.update(time=now, done=done)
        env.emit({"type": "step", "epoch": epoch, "done": done, "steps": plan.steps_per_epoch, "loss": loss,
                  "lr": lrs[-1] if lrs else 0.0, "images_per_s": images_per_s})

    return on_step


def _finish(spec, splits, model, env, folder: RunFolder, state: RunState, wall_s: float, diverged: str | None) -> dict:
    """Evaluate the best checkpoint on the test split (all ranks) and build the summary.

    Evaluation runs on the unwrapped model: DDP's forward may broadcast buffers, and shards of
    unequal length would leave one rank waiting.
    """
    summary = {
        "name": spec.name, "status": "diverged" if diverged else "completed", "message": diverged,
        "epochs_completed": len(state.rows), "epochs": spec.schedule.epochs, "wall_s": wall_s,
        "best_epoch": state.best["epoch"] if state.best else None,
        "best_val_acc1": state.best["val_acc1"] if state.best else None,
        "test_acc1": None, "test_acc5": None, "test_loss": None, "test_images": 0,
        "images_per_s_mean": float(np.mean([r["images_per_s"] for r in state.rows])) if state.rows else None,
        "run_folder": folder.uri,
    }
    if diverged or not state.rows:
        return summary
    if folder.exists(f"{BEST_DIR}/{CHECKPOINT_FILE}"):
        best = ckpt.from_bytes(folder.read_bytes(f"{BEST_DIR}/{CHECKPOINT_FILE}"), f"{folder.uri}/{BEST_DIR}/{CHECKPOINT_FILE}")
        ckpt.load_model_state(model, best["model"], BEST_DIR)
    if splits.test is not None:
        test_set = make_dataset(splits.test, spec.data, False, "test")
        test = evaluate(model, eval_loader(test_set, spec.data, EVAL_BATCH_SIZE, env.rank, env.world_size),
                        env.device, spec.scaling.amp, spec.scaling.channels_last)
        summary.update(test_acc1=test.acc1, test_acc5=test.acc5, test_loss=test.loss, test_images=test.images)
    if env.rank == 0:
        from safetensors.torch import save

        weights = {k: v.contiguous() for k, v in ckpt.cpu_state_dict(model).items()}
        folder.write_bytes(WEIGHTS_FILE, save(weights, metadata={"arch": spec.model.arch, "epoch": str(summary["best_epoch"]),
                                                                 "classes": ",".join(splits.class_names)}))
    return summary

