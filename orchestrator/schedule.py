"""The learning-rate schedule as a pure function of the optimizer step, and the registry of decays.

`lr_multiplier(step, sched, plan, metric_history)` returns the factor applied to the plan's
`scaled_lr` (and so to every group's `lr_mult`): a linear warmup over `plan.warmup_steps` composed
with the decay named by `schedule.name`. `DECAYS` is the registry of those names; the spec's
validation reads it. There is no hidden state, so a run resumed at any step gets exactly the LR an
unbroken run has there. `plateau` depends on the step and the per-epoch metric history, replayed
here from scratch. Decays are counted in epochs as torch's schedulers do (StepLR, MultiStepLR,
ExponentialLR step once per epoch); cosine anneals per step over the steps after warmup. No torch,
no ray.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.plan import Plan
    from orchestrator.spec import ScheduleSpec


@dataclass(frozen=True)
class Moment:
    """Where a run stands at one optimizer step, as the decays need it."""

    step: int
    epoch: int
    """epochs finished before this step"""
    progress: float
    """share of the post-warmup steps done, 0..1"""
    metric_history: Sequence[float]
    """the plateau metric of each finished epoch, oldest first"""


def warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    """Linear ramp from start_factor at step 0 to 1.0 at warmup_steps (and after)."""
    if step >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * step / warmup_steps


def plateau_reductions(history: Sequence[float], mode: str, patience: int, threshold: float) -> int:
    """How many times ReduceLROnPlateau (rel threshold, no cooldown) would have cut the LR.

    `history` holds one metric value per finished epoch, oldest first; `mode` is 'min' or 'max'.
    """
    best = math.inf if mode == "min" else -math.inf
    bad_epochs = reductions = 0
    for value in history:
        improved = value < best * (1 - threshold) if mode == "min" else value > best * (1 + threshold)
        if math.isinf(best) or improved:
            best, bad_epochs = value, 0
        else:
            bad_epochs += 1
        if bad_epochs > patience:
            reductions += 1
            bad_epochs = 0
    return reductions


def _cosine(sched: ScheduleSpec, at: Moment, min_factor: float) -> float:
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * at.progress))


def _plateau(sched: ScheduleSpec, at: Moment, min_factor: float) -> float:
    from orchestrator.metrics import WATCHABLE

    cuts = plateau_reductions(at.metric_history[:at.epoch], WATCHABLE[sched.plateau_metric], sched.patience,
                              sched.plateau_threshold)
    return max(sched.gamma ** cuts, min_factor)


DECAYS: dict[str, Callable[[ScheduleSpec, Moment, float], float]] = {
    "constant": lambda sched, at, min_factor: 1.0,
    "step": lambda sched, at, min_factor: max(sched.gamma ** (at.epoch // sched.step_size), min_factor),
    "multistep": lambda sched, at, min_factor: max(sched.gamma ** bisect.bisect_right(sched.milestones, at.epoch), min_factor),
    "exponential": lambda sched, at, min_factor: max(sched.gamma ** at.epoch, min_factor),
    "cosine": _cosine,
    "plateau": _plateau,
}
"""schedule.name -> decay factor (1.0 = none) at a moment, floored at (cosine: annealed to) min_factor"""


def lr_multiplier(step: int, sched: ScheduleSpec, plan: Plan, metric_history: Sequence[float] = ()) -> float:
    """Factor on plan.scaled_lr at optimizer step `step` (0-based): warmup x decay.

    Reads plan.steps_per_epoch, warmup_steps, total_steps and scaled_lr (min_lr is absolute).
    `metric_history`: the plateau metric of each finished epoch (only `plateau` reads it).
    """
    decay_steps = max(1, plan.total_steps - plan.warmup_steps)
    at = Moment(step, step // plan.steps_per_epoch, min(1.0, max(0.0, (step - plan.warmup_steps) / decay_steps)),
                metric_history)
    min_factor = min(1.0, sched.min_lr / plan.scaled_lr)
    return warmup_factor(step, plan.warmup_steps, sched.warmup_start_factor) * DECAYS[sched.name](sched, at, min_factor)
