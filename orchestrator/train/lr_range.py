"""`orchestrator find-lr`: an LR range test (Smith 2017) of a job, in one process, at its global batch.

The job's model, data, parameter groups and optimizer are built as a worker builds them; then the LR
grows exponentially, one optimizer step at a time, from `start_lr` to `end_lr` (both the LR of a
group with lr_mult 1 at the job's global batch; the head keeps its multiple). One process holds the
plan's global batch by accumulating: `per_worker_batch_size` images per micro-batch,
`num_workers x grad_accum_steps` micro-batches per step, so every step sees the batch a run of the
job sees. The loss is smoothed (bias-corrected exponential average over about a tenth of the
steps); the test stops once the
smoothed loss passes `DIVERGED_FACTOR` x its minimum, or the loss is not finite.

The suggestion is the LR of the smoothed loss's minimum divided by ten (the rule of Smith's paper
and fastai's `lr_min`): the largest LR that still clearly lowers the loss. It is stated at the
global batch and as `optim.base_lr` at the job's `base_batch_size` through the job's `lr_scaling`,
so the plan's scaling gives the right LR at any world size. Writes nothing into run storage.
Imports no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from orchestrator.config.errors import UserError
from orchestrator.config.jobfile import validate_spec
from orchestrator.config.plan import Plan
from orchestrator.config.keys import with_values
from orchestrator.config.spec import JobSpec
from orchestrator.data.loaders import make_dataset, start_epoch, train_loader
from orchestrator.train.run import build_trainee, seed_epoch
from orchestrator.data.splits import Splits
from orchestrator.train.loop import DivergenceError, StepSettings, Trainee, train_one_epoch
from orchestrator.train.models import build_model
from orchestrator.train.resolve import resolve_plan

SMOOTHING_STEPS_FRACTION = 0.1
"""the loss's exponential average spans about this fraction of the test's steps (at least MIN_SMOOTHING_STEPS):
a span as long as fastai's (beta 0.98, ~50 steps) lags a 100-step ramp by most of a decade"""
MIN_SMOOTHING_STEPS = 5
DIVERGED_FACTOR = 4.0
"""the test stops once the smoothed loss exceeds this many times its minimum"""
MIN_STEPS = 20
SUGGESTION_DIVISOR = 10.0
SKIP_START_STEPS = 5
"""the first steps' smoothed loss is left out of the minimum (the average has barely started)"""


class RangeTestError(UserError):
    """The job cannot be range-tested as asked (exit 2, one line)."""


def ramp_lr(step: int, steps: int, start_lr: float, end_lr: float) -> float:
    """The LR at `step` (0-based) of an exponential ramp from start_lr (step 0) to end_lr (step steps-1)."""
    return start_lr * (end_lr / start_lr) ** (step / max(steps - 1, 1))


def smoothing_beta(steps: int) -> float:
    """The exponential average's weight of the past for a test of `steps` steps (span = 1 / (1 - beta) steps)."""
    return 1.0 - 1.0 / max(MIN_SMOOTHING_STEPS, steps * SMOOTHING_STEPS_FRACTION)


def smooth(losses: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average of the losses, one value per step."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** i))
    return out


def suggest_index(smoothed: list[float]) -> int:
    """Index of the smoothed loss's minimum, the first SKIP_START_STEPS steps left out when there are enough."""
    start = SKIP_START_STEPS if len(smoothed) > 2 * SKIP_START_STEPS else 0
    return min(range(start, len(smoothed)), key=smoothed.__getitem__)


def base_lr_for(lr: float, global_batch_size: int, base_batch_size: int, lr_scaling: str) -> float:
    """The optim.base_lr that the plan scales to `lr` at this global batch (the inverse of plan.scale_lr)."""
    from orchestrator.config.plan import scale_lr

    factor, _ = scale_lr(1.0, global_batch_size, base_batch_size, lr_scaling)
    return lr / factor


@dataclass
class RangeTest:
    """What the test saw: per step the LR (of an lr_mult-1 group), the mean micro-batch loss and its smoothed value."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    global_batch_size: int
    micro_batches_per_step: int
    base_batch_size: int
    lr_scaling: str
    stopped: str
    """why it ended: 'ran all N steps' or where the loss diverged"""

    @property
    def best_index(self) -> int:
        return suggest_index(self.smoothed)

    @property
    def min_loss_lr(self) -> float:
        return self.lrs[self.best_index]

    @property
    def suggested_lr(self) -> float:
        """At the job's global batch: the minimum's LR over SUGGESTION_DIVISOR."""
        return self.min_loss_lr / SUGGESTION_DIVISOR

    @property
    def suggested_base_lr(self) -> float:
        return base_lr_for(self.suggested_lr, self.global_batch_size, self.base_batch_size, self.lr_scaling)

    def to_json(self) -> dict:
        return {"suggested_lr": self.suggested_lr, "suggested_base_lr": self.suggested_base_lr,
                "min_loss_lr": self.min_loss_lr, "global_batch_size": self.global_batch_size,
                "base_batch_size": self.base_batch_size, "lr_scaling": self.lr_scaling, "stopped": self.stopped,
                "points": [{"lr": lr, "loss": loss, "smoothed": s}
                           for lr, loss, s in zip(self.lrs, self.losses, self.smoothed)]}


def one_process_spec(spec: JobSpec) -> JobSpec:
    """The job on one process at the same global batch: its workers' micro-batches become accumulation steps."""
    scaling = spec.scaling
    return validate_spec(with_values(spec.to_dict(), {
        "scaling.num_workers": 1, "scaling.grad_accum_steps": scaling.max_workers * scaling.grad_accum_steps}))


class _Stop(Exception):
    """Raised from the step callback once the smoothed loss has diverged."""


def range_test(spec: JobSpec, steps: int = 100, start_lr: float = 1e-6, end_lr: float = 10.0,
               on_step=None) -> RangeTest:
    """Run the LR range test of `spec` (see the module docstring); `on_step(step, lr, loss)` sees each step."""
    if steps < MIN_STEPS:
        raise RangeTestError(f"--steps: {steps}; the range test needs at least {MIN_STEPS} steps")
    if not 0 < start_lr < end_lr:
        raise RangeTestError(f"--start-lr {start_lr:g} and --end-lr {end_lr:g}: need 0 < start < end")
    one, plan, trainee, loader = _trainee_and_loader(spec)
    lrs: list[float] = []
    losses: list[float] = []
    best, beta, average = math.inf, smoothing_beta(steps), 0.0

    def record(step: int, loss, group_lrs: list[float]) -> None:
        nonlocal best, average
        loss = float(loss)   # every step's loss is the range test's data: read each one
        if not math.isfinite(loss):
            raise _Stop(f"loss not finite at step {step} (lr {ramp_lr(step, steps, start_lr, end_lr):.3g})")
        lrs.append(ramp_lr(step, steps, start_lr, end_lr))
        losses.append(loss)
        average = beta * average + (1 - beta) * loss       # smooth()'s last value, kept as it goes
        smoothed = average / (1 - beta ** len(losses))
        if on_step:
            on_step(step, lrs[-1], loss)
        if len(losses) > SKIP_START_STEPS:
            best = min(best, smoothed)
        if smoothed > DIVERGED_FACTOR * best:
            raise _Stop(f"smoothed loss passed {DIVERGED_FACTOR:g} x its minimum at step {step} (lr {lrs[-1]:.3g})")

    stopped = f"ran all {steps} steps"
    try:
        _ramp(one, plan, trainee, loader, lambda step: ramp_lr(step, steps, start_lr, end_lr) / plan.scaled_lr,
              steps, record)
    except _Stop as exc:
        stopped = str(exc)
    except DivergenceError:
        stopped = f"loss not finite at step {len(losses)} (lr {ramp_lr(len(losses), steps, start_lr, end_lr):.3g})"
    if len(losses) < MIN_STEPS // 2:
        raise RangeTestError(f"the loss diverged after {len(losses)} steps ({stopped}); lower --start-lr "
                             f"({start_lr:g}) or check the job")
    return RangeTest(lrs, losses, smooth(losses, beta), plan.global_batch_size, plan.grad_accum_steps,
                     spec.optim.base_batch_size, spec.optim.lr_scaling, stopped)


@dataclass
class OneProcess:
    """A job built on one process as `fit` builds it (no EMA, no SWATS): what find-lr and doctor train."""

    spec: JobSpec
    """the one-process job (one_process_spec)"""
    plan: Plan
    splits: Splits
    num_classes: int
    trainee: Trainee
    train_set: object
    """the training split as the loaders read it (data.loaders.make_dataset)"""


def one_process(spec: JobSpec, unreadable: Callable[[str], Exception]) -> OneProcess:
    """The job built on one process; `unreadable(message)` is raised when its data is not on this machine."""
    one = one_process_spec(spec)
    resolved = resolve_plan(one, 1)
    plan, splits = resolved.plan, resolved.splits
    if splits is None:
        raise unreadable(f"data.source: {spec.data.source} is not readable here")
    device = torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    torch.manual_seed(spec.seed)
    built = build_model(one.model, resolved.num_classes, one.data.image_size, splits.class_names)
    trainee = build_trainee(one, plan, built.model, list(built.frozen), device, averaging=False)
    return OneProcess(one, plan, splits, resolved.num_classes, trainee, make_dataset(splits.train, one.data, True, "train"))


def _trainee_and_loader(spec: JobSpec):
    """(the one-process job, its plan, its trainee, its training loader)."""
    run = one_process(spec, lambda message: RangeTestError(f"{message}; find-lr trains on the data"))
    loader = train_loader(run.train_set, run.spec.data, run.plan, 0, run.spec.seed, run.num_classes)
    return run.spec, run.plan, run.trainee, loader


def _ramp(one: JobSpec, plan, trainee, loader, multiplier, steps: int, record) -> None:
    """`steps` optimizer steps at LR factor `multiplier(step)`, epoch after epoch; `record` sees each step."""
    step, epoch = 0, 0
    device = next(trainee.model.parameters()).device
    while step < steps:
        chunk = min(plan.steps_per_epoch, steps - step)
        settings = StepSettings(chunk, plan.grad_accum_steps, multiplier, device, one.scaling.amp,
                                one.scaling.channels_last, one.optim.grad_clip_norm, one.loss.label_smoothing,
                                (one.data.mean, one.data.std))
        loader.generator.manual_seed(seed_epoch(one.seed, epoch, 0))
        start_epoch(loader, epoch)
        train_one_epoch(trainee, loader, settings, epoch, step, record)
        step += chunk
        epoch += 1


def table_rows(test: RangeTest, per_decade: int = 3) -> list[tuple[float, float, float]]:
    """(lr, loss, smoothed) at about `per_decade` points per decade of LR, plus the last step."""
    rows, next_log = [], -math.inf
    for i, lr in enumerate(test.lrs):
        if math.log10(lr) >= next_log or i == len(test.lrs) - 1:
            rows.append((lr, test.losses[i], test.smoothed[i]))
            next_log = math.log10(lr) + 1 / per_decade
    return rows
