"""One worker's run as it goes: what differs between a Ray Train worker and an in-process run (`WorkerEnv`),
the run's job, plan and state (`Run`), the per-epoch seeds, and the trainee as `fit` and `find-lr` build it.

Imports no Ray: `WorkerEnv` carries rank, world size, device, how to wrap the model (DDP or not), how
to report an epoch (with its checkpoint) and where to resume from.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from orchestrator.config.plan import Plan
from orchestrator.config.schedule import group_multipliers, group_schedule
from orchestrator.config.spec import JobSpec
from orchestrator.store.storage import RunFolder
from orchestrator.train import checkpoint as ckpt
from orchestrator.train import progress
from orchestrator.train.eventlog import EventLog
from orchestrator.train.tracking import MlflowLog
from orchestrator.train.loop import StepSettings, Trainee, make_ema
from orchestrator.train.models import frozen_norm_layers
from orchestrator.train.optim import SwatsTracker, build_optimizer


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
    emit: Callable[[progress.Event], None] = lambda event: None
    """progress events to the driver (called on rank 0 only)"""
    step_hook: Callable[[int], None] | None = None
    """called on every rank after each optimizer step with the step number (fault injection)"""
    on_start: Callable[[], None] = lambda: None
    """called on every rank once the run is known to start (data, model, weights and checkpoint all loaded)"""
    on_epoch_end: Callable[[dict], None] = lambda row: None
    """called on every rank with the epoch's metric row once everything of the epoch is written (checkpoint,
    metrics.parquet): a sweep trial reports to Tune here, where being stopped loses nothing"""
    train_batches: Callable[[int], Iterable] | None = None
    """epoch -> this rank's training micro-batches, when the framework delivers them (data.loader: ray_data);
    None: a DataLoader over the split"""

    def log(self, text: str) -> None:
        if self.rank == 0:
            self.emit(progress.Log(text))


@dataclass
class Run:
    """One worker's run as it goes: the job, the plan, where it writes, and how far it is."""

    spec: JobSpec
    plan: Plan
    env: WorkerEnv
    folder: RunFolder
    state: ckpt.TrainingState
    started: float
    """time.perf_counter() when this process began the run"""
    unfreeze: list[tuple[int, list[str]]]
    """(epoch, parameter names that start training at it)"""
    events: EventLog | None = None
    tracker: MlflowLog | None = None
    """rank 0's MLflow run (run.mlflow / MLFLOW_TRACKING_URI), or None"""
    """TensorBoard event files (rank 0)"""
    loader_workers: int = 0
    """DataLoader processes of this rank's loaders (data.loader_workers, or what auto picked)"""

    def step_settings(self) -> StepSettings:
        schedules = {g.name: group_schedule(self.spec.schedule, g.schedule) for g in self.plan.param_groups}

        def multiplier(step: int) -> dict[str, float]:
            return group_multipliers(step, schedules, self.plan, self.state.metric_history)

        scaling = self.spec.scaling
        return StepSettings(self.plan.steps_per_epoch, self.plan.grad_accum_steps, multiplier, self.env.device,
                            scaling.amp, scaling.channels_last, self.spec.optim.grad_clip_norm,
                            self.spec.loss.label_smoothing, (self.spec.data.mean, self.spec.data.std),
                            self.spec.run.checkpoint_every_steps,
                            tuple(self.plan.class_weights) if self.plan.class_weights else None)


def seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Seed torch, numpy and random from (seed, epoch, rank); returns the seed used."""
    value = (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


def build_trainee(spec: JobSpec, plan: Plan, model: nn.Module, frozen: list[str], device: torch.device,
                  averaging: bool = True) -> Trainee:
    """The model on `device` (channels_last when asked) with its optimizer over the plan's groups, the
    GradScaler of fp16 and, with `averaging`, the EMA and SWATS tracker the job asks for (an LR range test
    has neither). `frozen`: the names of the parameters that do not train now."""
    model.to(device)
    if spec.scaling.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = make_ema(model, spec.model.ema_decay) if averaging and spec.model.ema_decay is not None else None
    swats = averaging and spec.optim.switch_to_sgd_at_epoch is not None
    return Trainee(
        model, build_optimizer(model, plan.param_groups, spec.optim), optimizer_name=spec.optim.name,
        swats=SwatsTracker(spec.optim.betas[1]) if swats else None,
        scaler=torch.amp.GradScaler("cuda") if spec.scaling.amp == "fp16" else None, frozen=frozen,
        eval_modules=[] if spec.model.train_bn else frozen_norm_layers(model), ema=ema)
