"""The driver's planning: from a validated spec to the plan, with training-set size, class count and
the parameter counts of each group.

`resolve_plan(spec, world_size)` counts the training images of the data when it can read it; when
it cannot (an ImageNet job whose data lives on the cluster), `data.num_train_samples` and an
explicit `model.num_classes` stand in. Parameters are counted on the meta device, so no weights are
read or allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from orchestrator.config.plan import GroupSize, Plan, PlanGroup, class_weights, make_plan, plan_groups
from orchestrator.config.spec import JobSpec
from orchestrator.data.augment import check_transforms
from orchestrator.data.sources import load_splits
from orchestrator.data.splits import DataError, Split, Splits
from orchestrator.train.compiled import check_compile
from orchestrator.train.layer_decay import layer_ids
from orchestrator.train.models import (
    build_on_meta,
    check_arch,
    check_input_size,
    freeze_targets,
    head_module_names,
    set_trainable,
    unfreeze_steps,
)
from orchestrator.train.optim import param_group_sizes


@dataclass
class Resolved:
    plan: Plan
    num_classes: int
    splits: Splits | None
    """None when the plan was made from data.num_train_samples without reading the data"""


def resolve_num_classes(spec: JobSpec, splits: Splits | None) -> int:
    if spec.model.num_classes != "auto":
        return int(spec.model.num_classes)
    assert splits is not None, "num_classes auto needs the data"
    return splits.num_classes


def meta_model(spec: JobSpec, num_classes: int) -> torch.nn.Module:
    """The spec's model with its freezing at the start, built on the meta device (no memory, no weights).
    Freeze and unfreeze entries that select nothing fail here, before any worker starts."""
    model = build_on_meta(spec.model.arch, num_classes, spec.data.image_size, spec.model.drop_path_rate)
    if spec.model.freeze:
        head = head_module_names(spec.model.arch, spec.data.image_size)
        frozen = freeze_targets(model, spec.model.freeze, head)
        set_trainable(model, frozen, False)
        unfreeze_steps(model, spec.model, frozen, head)
    return model


def count_group_sizes(spec: JobSpec, groups: list[PlanGroup], num_classes: int) -> list[GroupSize]:
    """Sizes of the plan's groups in the spec's model with its freezing at the start."""
    return param_group_sizes(meta_model(spec, num_classes), groups)


def with_model_groups(plan: Plan, spec: JobSpec, num_classes: int) -> Plan:
    """The plan's groups split by the model's depths (optim.layer_decay), with their parameter counts."""
    model = meta_model(spec, num_classes)
    if spec.optim.layer_decay is not None:
        plan = replace(plan, param_groups=plan_groups(spec, plan.scaled_lr, layer_ids(model)[1]))
    return plan.with_group_sizes(param_group_sizes(model, plan.param_groups))


def resolve_plan(spec: JobSpec, world_size: int, splits: Splits | None = None) -> Resolved:
    """The plan for this spec at this world size, from the data or, when it is out of reach, the spec."""
    check_arch(spec.model.arch)
    check_compile(spec)
    check_transforms(spec)
    stand_ins = spec.data.num_train_samples is not None and spec.model.num_classes != "auto"
    if splits is None:
        try:
            splits = load_splits(spec.data, spec.seed)
        except DataError:
            if not stand_ins:
                raise
    num_train = len(splits.train) if splits is not None else spec.data.num_train_samples
    num_classes = resolve_num_classes(spec, splits)
    check_input_size(spec.model.arch, num_classes, spec.data.image_size)
    plan = with_model_groups(make_plan(spec, num_train, world_size), spec, num_classes)
    counts = train_class_counts(splits, num_classes)
    if spec.loss.class_weights != "none":
        plan = replace(plan, class_weights=class_weights(spec, counts))
    return Resolved(plan, num_classes, splits)


def train_class_counts(splits: Splits | None, num_classes: int) -> list[int] | None:
    """Images of each class in the train split held in memory; None for a streamed split or no data."""
    if splits is None or not isinstance(splits.train, Split):
        return None
    return np.bincount(splits.train.labels, minlength=num_classes).tolist()


def check_weights_fit(spec: JobSpec, resolved: Resolved) -> None:
    """Load `model.weights` into the model once, here, as a worker would: WeightsError or ModelError
    when they do not fit (a sweep checks this before starting any trial)."""
    from orchestrator.train.models import build_model

    if spec.model.weights is not None:
        class_names = resolved.splits.class_names if resolved.splits else None
        build_model(spec.model, resolved.num_classes, spec.data.image_size, class_names)
