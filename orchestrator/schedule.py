"""The learning-rate schedule as a pure function of the optimizer step.

`lr_multiplier(step, ...)` returns the factor applied to the plan's `scaled_lr` (and so to every
group's `lr_mult`): a linear warmup over `warmup_steps` composed with the decay. There is no
hidden state, so a run resumed at any step gets exactly the LR an unbroken run has there.
`plateau` depends on the step and the per-epoch metric history, replayed here from scratch.
Decays are counted in epochs as torch's schedulers do (StepLR, MultiStepLR, ExponentialLR step once
per epoch); cosine anneals per step over the steps after warmup. No torch, no ray.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from orchestrator.spec import ScheduleSpec


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


def decay_factor(step: int, sched: ScheduleSpec, steps_per_epoch: int, warmup_steps: int, total_steps: int,
                 min_factor: float, metric_history: Sequence[float] = ()) -> float:
    """The decay part of the multiplier at `step` (1.0 = no decay), floored at min_factor."""
    epoch = step // steps_per_epoch
    name = sched.name
    if name == "constant":
        return 1.0
    if name == "cosine":
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "step":
        factor = sched.gamma ** (epoch // sched.step_size)
    elif name == "multistep":
        factor = sched.gamma ** bisect.bisect_right(sched.milestones, epoch)
    elif name == "exponential":
        factor = sched.gamma ** epoch
    elif name == "plateau":
        mode = "min" if sched.plateau_metric.endswith("loss") else "max"
        factor = sched.gamma ** plateau_reductions(metric_history[:epoch], mode, sched.patience, sched.plateau_threshold)
    else:
        raise ValueError(f"unknown schedule {name!r}; valid: constant, step, multistep, exponential, cosine, plateau")
    return max(factor, min_factor)


def lr_multiplier(step: int, sched: ScheduleSpec, steps_per_epoch: int, warmup_steps: int, total_steps: int,
                  scaled_lr: float, metric_history: Sequence[float] = ()) -> float:
    """Factor on scaled_lr at optimizer step `step` (0-based): warmup x decay.

    `metric_history`: the plateau metric of each finished epoch (only `plateau` reads it).
    """
    min_factor = min(1.0, sched.min_lr / scaled_lr)
    return warmup_factor(step, warmup_steps, sched.warmup_start_factor) * decay_factor(
        step, sched, steps_per_epoch, warmup_steps, total_steps, min_factor, metric_history)
