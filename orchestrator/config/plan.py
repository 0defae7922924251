"""The plan: the numbers a job resolves to before anything runs.

`make_plan(spec, num_train_samples, world_size, group_sizes)` is a pure function (no torch, no
ray): global batch, scaled learning rate and how it was derived, steps per epoch, warmup and total
steps (all in optimizer steps), and each parameter group's LR and weight decay. The plan is the
single source of truth: it is saved as plan.json, handed to every worker as it is (no worker
re-plans), and the optimizer is built from its `param_groups`. Parameter counts come in from outside
(`resolve.count_group_sizes`, `Plan.with_group_sizes`) so this module stays free of torch.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, replace

from orchestrator.config.errors import JobError
from orchestrator.config.spec import JobSpec

NORM_BIAS_SUFFIX = " [norm/bias]"
REST_GROUP = "rest"


@dataclass(frozen=True)
class GroupSize:
    name: str
    num_params: int
    trainable: int


@dataclass
class PlanGroup:
    """One optimizer parameter group: the optimizer is built from exactly these (optim.build_optimizer)."""

    name: str
    match: str | None
    """glob over parameter names; None = every parameter no earlier group took"""
    lr_mult: float
    lr: float
    """peak LR of this group: scaled_lr x lr_mult"""
    weight_decay: float
    norm_bias: bool = False
    """True: holds only the norm-layer weights and biases (1-D tensors) of its match"""
    schedule: dict | None = None
    """schedule keys this group has of its own (param_groups[].schedule); None: the job's schedule"""
    num_params: int | None = None
    trainable: int | None = None
    layer: int | None = None
    """optim.layer_decay: the depth this group holds (0 = stem; train.layer_decay says which); None: every depth"""


@dataclass
class Plan:
    world_size: int
    per_worker_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    """images per optimizer step, all workers together"""
    base_lr: float
    base_batch_size: int
    lr_scaling: str
    scaled_lr: float
    lr_derivation: str
    num_train_samples: int
    steps_per_epoch: int
    """optimizer steps per epoch; the last partial global batch is dropped"""
    dropped_samples_per_epoch: int
    warmup_epochs: float
    warmup_steps: int
    total_steps: int
    epochs: int
    param_groups: list[PlanGroup] = field(default_factory=list)
    class_weights: list[float] | None = None
    """the training loss's weight of each class, in class order (loss.class_weights); None: unweighted"""
    elastic_sizes: list[dict] | None = None
    """scaling.num_workers {min, max}: per world size, {world_size, per_worker_batch_size, grad_accum_steps}
    that keep global_batch_size; None: a fixed size"""

    def to_dict(self) -> dict:
        return asdict(self)

    def for_world_size(self, world_size: int) -> "Plan":
        """This plan on `world_size` workers (an elastic run's resize): the size's per-worker batch and
        accumulation from `elastic_sizes`; global batch, LR, steps and schedule unchanged."""
        if world_size == self.world_size:
            return self
        row = next((r for r in self.elastic_sizes or [] if r["world_size"] == world_size), None)
        if row is None:
            raise PlanError(f"the plan has no row for {world_size} workers (sizes: "
                            f"{', '.join(str(r['world_size']) for r in self.elastic_sizes or []) or self.world_size})")
        return replace(self, **row)

    def resize_line(self, other: "Plan") -> str:
        """One line saying what a resize from this plan to `other` changed and what it kept."""
        return (f"{self.world_size} -> {other.world_size} workers: per-worker batch {self.per_worker_batch_size} -> "
                f"{other.per_worker_batch_size}, grad accumulation {self.grad_accum_steps} -> {other.grad_accum_steps}; "
                f"kept: global batch {other.global_batch_size}, LR {other.scaled_lr:.6g}, {other.steps_per_epoch} "
                f"steps/epoch, {other.warmup_steps} warmup and {other.total_steps} total steps")

    def with_group_sizes(self, sizes: list[GroupSize]) -> "Plan":
        """A copy whose groups carry their parameter counts (total, trainable)."""
        by_name = {size.name: size for size in sizes}
        groups = [replace(g, num_params=by_name[g.name].num_params, trainable=by_name[g.name].trainable)
                  if g.name in by_name else g for g in self.param_groups]
        return replace(self, param_groups=groups)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        groups = [PlanGroup(**g) for g in data.get("param_groups", [])]
        return cls(**{**data, "param_groups": groups})


class PlanError(JobError, ValueError):
    """The spec is valid but cannot run on this data or this many workers."""


def class_weights(spec: JobSpec, class_counts: list[int] | None) -> list[float] | None:
    """loss.class_weights for these train-split counts per class: None (none), N / (C x n_c) (balanced,
    sklearn's; a class without images gets 0), or the list given (PlanError when its length is not C)."""
    chosen = spec.loss.class_weights
    if chosen == "none":
        return None
    if chosen == "balanced":
        if class_counts is None:
            raise PlanError("loss.class_weights: balanced needs the train split's labels, which are not readable here")
        total, classes = sum(class_counts), len(class_counts)
        return [total / (classes * n) if n else 0.0 for n in class_counts]
    if class_counts is not None and len(chosen) != len(class_counts):
        raise PlanError(f"loss.class_weights: {len(chosen)} weights for {len(class_counts)} classes; give one per class")
    return list(chosen)


def scale_lr(base_lr: float, global_batch_size: int, base_batch_size: int, lr_scaling: str) -> tuple[float, str]:
    """(scaled_lr, a sentence saying how): Goyal et al.'s linear rule, its sqrt variant, or none."""
    ratio = global_batch_size / base_batch_size
    if lr_scaling == "linear":
        factor, how = ratio, f"x ({global_batch_size} / {base_batch_size})"
    elif lr_scaling == "sqrt":
        factor, how = math.sqrt(ratio), f"x sqrt({global_batch_size} / {base_batch_size})"
    elif lr_scaling == "none":
        factor, how = 1.0, "(lr_scaling none)"
    else:
        raise PlanError(f"optim.lr_scaling: unknown {lr_scaling!r}; valid: linear, sqrt, none")
    scaled = base_lr * factor
    return scaled, f"scaled_lr = base_lr {base_lr:g} {how} = {scaled:.6g} ({lr_scaling} scaling, global batch {global_batch_size})"


def plan_groups(spec: JobSpec, scaled_lr: float, num_layers: int | None = None) -> list[PlanGroup]:
    """The parameter groups the optimizer gets, in match order, `rest` last.

    When norm layers and biases get their own weight decay, each group is split in two. With
    optim.layer_decay and the model's `num_layers`, each is split by depth, its lr_mult times
    layer_decay ** (num_layers - 1 - depth).
    """
    optim = spec.optim
    norm_bias_wd = optim.weight_decay if optim.norm_bias_weight_decay is None else optim.norm_bias_weight_decay
    split = norm_bias_wd != optim.weight_decay
    layers = range(num_layers) if optim.layer_decay is not None and num_layers else [None]
    groups: list[PlanGroup] = []
    sources = [(g.match, g.match, g.lr_mult, g.weight_decay, g.schedule) for g in optim.param_groups]
    sources.append((REST_GROUP, None, 1.0, None, None))
    for source, match, group_mult, wd, schedule in sources:
        decay = optim.weight_decay if wd is None else wd
        for layer in layers:
            name = source if layer is None else f"{source} [layer {layer}]"
            lr_mult = group_mult if layer is None else group_mult * optim.layer_decay ** (num_layers - 1 - layer)
            groups.append(PlanGroup(name, match, lr_mult, scaled_lr * lr_mult, decay, schedule=schedule, layer=layer))
            if split:
                groups.append(PlanGroup(name + NORM_BIAS_SUFFIX, match, lr_mult, scaled_lr * lr_mult,
                                        norm_bias_wd if wd is None else wd, norm_bias=True, schedule=schedule, layer=layer))
    return groups


def assign_group(param_name: str, is_norm_or_bias: bool, groups: list[PlanGroup], layer: int | None = None) -> int:
    """Index of the group a parameter belongs to: first matching glob wins, then norm/bias split, then
    its depth `layer` (optim.layer_decay)."""
    has_split = any(g.norm_bias for g in groups)
    for i, g in enumerate(groups):
        if g.match is not None and not fnmatch.fnmatchcase(param_name, g.match):
            continue
        if has_split and g.norm_bias != is_norm_or_bias:
            continue
        if g.layer is not None and g.layer != layer:
            continue
        return i
    raise AssertionError("the rest group matches everything")


def elastic_sizes(scaling) -> list[dict]:
    """Per world size in [min, max] of an elastic scaling.num_workers: the fewest accumulation steps whose
    micro-batch divides the global batch (per_worker_batch_size x max x grad_accum_steps) exactly and is at
    most per_worker_batch_size. PlanError naming the sizes that cannot."""
    global_batch = scaling.per_worker_batch_size * scaling.max_workers * scaling.grad_accum_steps
    rows, impossible = [], []
    for size in range(scaling.min_workers, scaling.max_workers + 1):
        accum = next((a for a in range(1, global_batch // size + 1) if global_batch % (size * a) == 0
                      and global_batch // (size * a) <= scaling.per_worker_batch_size), None)
        if accum is None:
            impossible.append(size)
        else:
            rows.append({"world_size": size, "per_worker_batch_size": global_batch // (size * accum), "grad_accum_steps": accum})
    if impossible:
        fits = [s for s in range(1, scaling.max_workers + 1) if global_batch % s == 0]
        raise PlanError(f"scaling.num_workers: the global batch {global_batch} (per_worker_batch_size "
                        f"{scaling.per_worker_batch_size} x {scaling.max_workers} workers x grad_accum_steps "
                        f"{scaling.grad_accum_steps}) cannot be split evenly over {', '.join(map(str, impossible))} "
                        f"worker(s); sizes that can: {', '.join(map(str, fits))}")
    return rows


def make_plan(spec: JobSpec, num_train_samples: int, world_size: int) -> Plan:
    """Spec + dataset size + world size -> Plan. Pure. Raises PlanError when it cannot train.

    The groups carry no parameter counts yet: `Plan.with_group_sizes` adds them once a model exists.
    """
    if world_size < 1:
        raise PlanError(f"world size must be >= 1 (got {world_size})")
    scaling, optim, sched = spec.scaling, spec.optim, spec.schedule
    global_batch = scaling.per_worker_batch_size * world_size * scaling.grad_accum_steps
    steps_per_epoch = num_train_samples // global_batch
    if steps_per_epoch == 0:
        raise PlanError(
            f"data: {num_train_samples} training images are fewer than one global batch of {global_batch} "
            f"(scaling.per_worker_batch_size {scaling.per_worker_batch_size} x {world_size} workers x "
            f"grad_accum_steps {scaling.grad_accum_steps}); lower the batch size"
        )
    scaled_lr, derivation = scale_lr(optim.base_lr, global_batch, optim.base_batch_size, optim.lr_scaling)
    return Plan(
        world_size=world_size,
        per_worker_batch_size=scaling.per_worker_batch_size,
        grad_accum_steps=scaling.grad_accum_steps,
        global_batch_size=global_batch,
        base_lr=optim.base_lr,
        base_batch_size=optim.base_batch_size,
        lr_scaling=optim.lr_scaling,
        scaled_lr=scaled_lr,
        lr_derivation=derivation,
        num_train_samples=num_train_samples,
        steps_per_epoch=steps_per_epoch,
        dropped_samples_per_epoch=num_train_samples - steps_per_epoch * global_batch,
        warmup_epochs=sched.warmup_epochs,
        warmup_steps=round(sched.warmup_epochs * steps_per_epoch),
        total_steps=sched.epochs * steps_per_epoch,
        epochs=sched.epochs,
        param_groups=plan_groups(spec, scaled_lr),
        elastic_sizes=elastic_sizes(scaling) if scaling.elastic and world_size == scaling.max_workers else None,
    )
