"""Every schedule, step by step, with warmup; checked against torch's own schedulers too."""

from types import SimpleNamespace

import pytest
import torch

from orchestrator.config.schedule import lr_multiplier, plateau_reductions
from orchestrator.config.spec import ScheduleSpec

STEPS_PER_EPOCH, WARMUP_STEPS, TOTAL = 4, 2, 12   # 3 epochs, warmup half an epoch
W = [0.1, 0.55]                                     # warmup factors at steps 0 and 1 (start 0.1)

PINNED = {
    "constant": ({}, W + [1.0] * 10),
    "step": ({"step_size": 1, "gamma": 0.5}, [0.1, 0.55, 1, 1, .5, .5, .5, .5, .25, .25, .25, .25]),
    "multistep": ({"milestones": [1, 2], "gamma": 0.1}, [0.1, 0.55, 1, 1, .1, .1, .1, .1, .01, .01, .01, .01]),
    "exponential": ({"gamma": 0.8}, [0.1, 0.55, 1, 1, .8, .8, .8, .8, .64, .64, .64, .64]),
    "cosine": ({}, [0.1, 0.55, 1.0, 0.975528, 0.904508, 0.793893, 0.654508, 0.5, 0.345492, 0.206107, 0.095492, 0.024472]),
    "cosine_min_lr": ({"min_lr": 0.1}, [0.1, 0.55, 1.0, 0.977975, 0.914058, 0.814503, 0.689058, 0.55, 0.410942, 0.285497, 0.185942, 0.122025]),
    # val_loss history 1.0, 1.0, 1.0: the second non-improving epoch (> patience 1) halves the LR from epoch 3
    "plateau": ({"patience": 1, "gamma": 0.5, "epochs": 5}, [0.1, 0.55, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, .5, .5, .5, .5, .5, .5, .5, .5]),
}
PLATEAU_HISTORY = [1.0, 1.0, 1.0, 0.5, 0.5]


def steps(steps_per_epoch: int, warmup_steps: int, total_steps: int, scaled_lr: float = 1.0) -> SimpleNamespace:
    """The plan's numbers the schedule reads."""
    return SimpleNamespace(steps_per_epoch=steps_per_epoch, warmup_steps=warmup_steps, total_steps=total_steps,
                           scaled_lr=scaled_lr)


def pinned_schedule(case: str) -> ScheduleSpec:
    return ScheduleSpec(name=case.split("_")[0], warmup_epochs=0.5, warmup_start_factor=0.1, **{"epochs": 3, **PINNED[case][0]})


@pytest.mark.parametrize("case", list(PINNED))
def test_every_schedule_with_warmup_step_by_step(case):
    sched = pinned_schedule(case)
    total = sched.epochs * STEPS_PER_EPOCH
    got = [lr_multiplier(s, sched, steps(STEPS_PER_EPOCH, WARMUP_STEPS, total), PLATEAU_HISTORY) for s in range(total)]
    assert got == pytest.approx(PINNED[case][1], abs=1e-6)


@pytest.mark.parametrize("case", list(PINNED))
def test_resume_at_any_step_gives_the_unbroken_lr(case):
    """The multiplier is a pure function: computing it fresh at step s (a resumed run) equals the unbroken sequence."""
    sched = pinned_schedule(case)
    total = sched.epochs * STEPS_PER_EPOCH
    unbroken = [lr_multiplier(s, sched, steps(STEPS_PER_EPOCH, WARMUP_STEPS, total), PLATEAU_HISTORY) for s in range(total)]
    for resume_at in range(total):
        fresh = ScheduleSpec.model_validate(sched.model_dump())   # nothing carried over but the step
        resumed = [lr_multiplier(s, fresh, steps(STEPS_PER_EPOCH, WARMUP_STEPS, total), PLATEAU_HISTORY[: s // STEPS_PER_EPOCH])
                   for s in range(resume_at, total)]
        assert resumed == unbroken[resume_at:]


def _torch_lrs(scheduler_factory, epochs: int, metrics=None) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = scheduler_factory(opt)
    lrs = []
    for epoch in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(metrics[epoch]) if metrics is not None else sched.step()
    return lrs


@pytest.mark.parametrize("name, ours, theirs", [
    ("step", {"step_size": 3, "gamma": 0.5}, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    ("multistep", {"milestones": [2, 5, 7], "gamma": 0.3}, lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5, 7], gamma=0.3)),
    ("exponential", {"gamma": 0.9}, lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)),
    ("cosine", {"min_lr": 0.01}, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.01)),
])
def test_matches_torch_scheduler_without_warmup(name, ours, theirs):
    sched = ScheduleSpec(name=name, epochs=10, **ours)
    mine = [lr_multiplier(e, sched, steps(1, 0, 10)) for e in range(10)]
    assert mine == pytest.approx(_torch_lrs(theirs, 10), rel=1e-9)


def test_plateau_matches_torch_reduce_on_plateau():
    history = [1.0, 0.8, 0.8, 0.81, 0.79, 0.79, 0.79, 0.79, 0.5, 0.5, 0.5, 0.5]
    sched = ScheduleSpec(name="plateau", epochs=12, patience=2, gamma=0.5, plateau_threshold=1e-4)
    mine = [lr_multiplier(e, sched, steps(1, 0, 12), history) for e in range(12)]
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=2, threshold=1e-4), 12, history)
    assert mine == pytest.approx(theirs)


def test_plateau_max_mode_for_accuracy():
    assert plateau_reductions([0.5, 0.6, 0.6, 0.6, 0.6], "max", patience=1, threshold=0.0) == 1


def test_min_lr_floors_step_decay():
    sched = ScheduleSpec(name="step", epochs=10, step_size=1, gamma=0.1, min_lr=0.05)
    assert lr_multiplier(5, sched, steps(1, 0, 10, scaled_lr=0.5)) == pytest.approx(0.1)   # floor 0.05 / 0.5


def test_every_group_keeps_its_ratio():
    from orchestrator.train.optim import apply_lr

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [params[0]], "base_lr": 0.1}, {"params": [params[1]], "base_lr": 1.0}], lr=0.0)
    sched = ScheduleSpec(name="cosine", epochs=3, warmup_epochs=0.5)
    for step in range(12):
        low, high = apply_lr(opt, lr_multiplier(step, sched, steps(4, 2, 12, scaled_lr=0.1)))
        assert high == pytest.approx(10 * low)
