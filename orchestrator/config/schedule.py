"""The learning-rate schedule as a pure function of the optimizer step, and the registry of decays.

`lr_multiplier(step, sched, plan, metric_history)` returns the factor applied to the plan's
`scaled_lr` (and so to every group's `lr_mult`): a linear warmup over `plan.warmup_steps` composed
with the decay named by `schedule.name`. `DECAYS` is the registry of those names (their list for
the spec's validation is `catalog.DECAY_NAMES`). There is no hidden state, so a run resumed at any step gets exactly the LR an
unbroken run has there. `plateau` depends on the step and the per-epoch metric history, replayed
here from scratch. Decays are counted in epochs as torch's schedulers do (StepLR, MultiStepLR,
ExponentialLR step once per epoch); cosine and poly anneal per step over the steps after warmup;
onecycle follows torch's OneCycleLR per step; lambda evaluates `schedule.expression` (arithmetic of
epoch and step, parsed by a small whitelisting evaluator, never eval) like LambdaLR. Parameter
groups may have schedules of their own (`group_multipliers`). No torch, no ray.
"""

from __future__ import annotations

import ast
import bisect
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.config.catalog import DECAY_NAMES, WATCHABLE, same_names
from orchestrator.config.spec import ScheduleSpec

if TYPE_CHECKING:
    from orchestrator.config.plan import Plan


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
    variables: dict[str, int]
    """what a lambda expression may read: epoch, step, epochs, steps_per_epoch, total_steps"""


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
    cuts = plateau_reductions(at.metric_history[:at.epoch], WATCHABLE[sched.plateau_metric], sched.patience,
                              sched.plateau_threshold)
    return max(sched.gamma ** cuts, min_factor)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos}
_COMPARISONS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
                ast.Eq: operator.eq, ast.NotEq: operator.ne}
_FUNCTIONS = {"min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "sqrt": math.sqrt,
              "exp": math.exp, "log": math.log, "cos": math.cos, "sin": math.sin}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def evaluate_expression(text: str, variables: dict[str, float]) -> float:
    """The value of a small arithmetic expression: numbers, the variables, + - * / // % **, comparisons,
    `A if C else B`, and the functions of _FUNCTIONS. Anything else (attributes, subscripts, other names) is a ValueError;
    nothing is ever passed to eval."""
    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return float(node.value)   # floats overflow at once where integers would grow without bound
        if isinstance(node, ast.Name) and (node.id in variables or node.id in _CONSTANTS):
            return float(variables.get(node.id, _CONSTANTS.get(node.id)))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.IfExp):
            return value(node.body) if value(node.test) else value(node.orelse)
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARISONS for op in node.ops):
            left, result = value(node.left), True
            for op, right_node in zip(node.ops, node.comparators):
                right = value(right_node)
                result, left = result and _COMPARISONS[type(op)](left, right), right
            return float(result)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                and not node.keywords):
            return float(_FUNCTIONS[node.func.id](*[value(arg) for arg in node.args]))
        raise ValueError(f"{ast.unparse(node)!r} is not allowed (numbers, {', '.join(variables)}, + - * / // % **, "
                         f"comparisons, A if C else B, {', '.join(_FUNCTIONS)})")

    return float(value(ast.parse(text, mode="eval")))


def check_expression(text: str | None, epochs: int) -> str | None:
    """A problem with a lambda schedule's expression, or None: it must parse, use only what is allowed,
    and give a finite factor >= 0 at the start of every epoch."""
    if not text:
        return "schedule.name lambda needs an expression of epoch and step, e.g. '0.95 ** epoch'"
    try:
        for epoch in range(epochs):
            factor = evaluate_expression(text, {"epoch": epoch, "step": epoch, "epochs": epochs, "steps_per_epoch": 1,
                                                "total_steps": epochs})
            if not math.isfinite(factor) or factor < 0:
                return f"gives {factor} at epoch {epoch}; the LR factor must be finite and >= 0"
    except SyntaxError as exc:
        return f"not an expression ({exc.msg})"
    except OverflowError:
        return f"overflows a float at epoch {epoch}"
    except (ValueError, ArithmeticError, TypeError) as exc:
        return str(exc)
    return None


def _lambda(sched: ScheduleSpec, at: Moment, min_factor: float) -> float:
    return max(evaluate_expression(sched.expression, at.variables), min_factor)


def _onecycle(sched: ScheduleSpec, at: Moment, min_factor: float) -> float:
    """torch's OneCycleLR (two phases, cosine): 1/div_factor up to 1 over pct_start of the steps, then down
    to 1/(div_factor x final_div_factor)."""
    total = at.variables["total_steps"]
    rise_end = sched.pct_start * total - 1
    start, low = 1.0 / sched.div_factor, 1.0 / (sched.div_factor * sched.final_div_factor)
    if at.step <= rise_end:
        share, begin, end = at.step / rise_end, start, 1.0
    else:
        share, begin, end = (at.step - rise_end) / (total - 1 - rise_end), 1.0, low
    return end + (begin - end) / 2.0 * (math.cos(math.pi * min(share, 1.0)) + 1.0)


DECAYS: dict[str, Callable[[ScheduleSpec, Moment, float], float]] = {
    "constant": lambda sched, at, min_factor: 1.0,
    "step": lambda sched, at, min_factor: max(sched.gamma ** (at.epoch // sched.step_size), min_factor),
    "multistep": lambda sched, at, min_factor: max(sched.gamma ** bisect.bisect_right(sched.milestones, at.epoch), min_factor),
    "exponential": lambda sched, at, min_factor: max(sched.gamma ** at.epoch, min_factor),
    "cosine": _cosine,
    "plateau": _plateau,
    "lambda": _lambda,
    "onecycle": _onecycle,
    "poly": lambda sched, at, min_factor: min_factor + (1.0 - min_factor) * (1.0 - at.progress) ** sched.power,
}
"""schedule.name -> decay factor (1.0 = none) at a moment, floored at (cosine: annealed to) min_factor"""
same_names(DECAYS, DECAY_NAMES, "config.schedule.DECAYS")


def group_schedule(sched: ScheduleSpec, override: dict[str, Any] | None) -> ScheduleSpec:
    """A parameter group's schedule: the job's with the group's keys replaced (validated when the job is)."""
    return sched if not override else ScheduleSpec.model_validate({**sched.model_dump(), **override})


def lr_multiplier(step: int, sched: ScheduleSpec, plan: Plan, metric_history: Sequence[float] = ()) -> float:
    """Factor on plan.scaled_lr at optimizer step `step` (0-based): warmup x decay.

    Reads plan.steps_per_epoch, warmup_steps, total_steps and scaled_lr (min_lr is absolute).
    `metric_history`: the plateau metric of each finished epoch (only `plateau` reads it).
    """
    decay_steps = max(1, plan.total_steps - plan.warmup_steps)
    epoch = step // plan.steps_per_epoch
    variables = {"epoch": epoch, "step": step, "epochs": sched.epochs, "steps_per_epoch": plan.steps_per_epoch,
                 "total_steps": plan.total_steps}
    at = Moment(step, epoch, min(1.0, max(0.0, (step - plan.warmup_steps) / decay_steps)), metric_history, variables)
    min_factor = min(1.0, sched.min_lr / plan.scaled_lr)
    return warmup_factor(step, plan.warmup_steps, sched.warmup_start_factor) * DECAYS[sched.name](sched, at, min_factor)


def group_multipliers(step: int, schedules: dict[str, ScheduleSpec], plan: Plan,
                      metric_history: Sequence[float] = ()) -> dict[str, float]:
    """{group name: factor on its peak LR} at `step`, each group by its own schedule."""
    return {name: lr_multiplier(step, sched, plan, metric_history) for name, sched in schedules.items()}
