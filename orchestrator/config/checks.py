"""The checks across keys of a job that field types cannot express, and how a pydantic error is said.

`check_consistency(spec)` returns one line per problem, each naming its key; `format_error` turns a
pydantic error into such a line. Torch-free: capabilities come from `config.catalog`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.config.catalog import (OPTIMIZERS, PERTURBABLE, RANGE_KINDS, SEARCH_KINDS, SOURCES, ZERO_INIT_RESIDUAL_FAMILIES,
                                         augmentation_entry)
from orchestrator.config.errors import did_you_mean
from orchestrator.config.keys import MISSING, leaf_keys, lookup
from orchestrator.config.schedule import check_expression, group_schedule
from orchestrator.config.spec import JobSpec, ScalingSpec, ScheduleSpec


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic section class that owns the key at `loc` (for listing valid keys)."""
    model: Any = JobSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
            args = getattr(candidate, "__args__", ())
            inner = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if inner is not None:
                model = inner
                break
        else:
            return None
    return model if isinstance(model, type) else None


def format_error(err: dict) -> str:
    """One line naming the key of a pydantic error of a JobSpec (unknown keys and values with a did-you-mean)."""
    loc = tuple(p for p in err["loc"] if not str(p).startswith("<"))   # a union's tag (spec: "<count>") is no key
    key = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _model_at(loc)
        valid = list(owner.model_fields) if owner else []
        hint = did_you_mean(loc[-1], valid)
        listing = f"; valid keys here: {', '.join(valid)}" if valid else ""
        return f"{key}: unknown key{hint}{listing}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        valid = re.findall(r"'([^']*)'", expected)
        hint = did_you_mean(err.get("input"), valid)
        return f"{key}: unknown value {err.get('input')!r}{hint}; valid: {', '.join(valid)}"
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}", "less_than_equal": "<= {le}"}
    if kind in bounds:
        return f"{key}: must be {bounds[kind].format(**err['ctx'])} (got {err.get('input')!r})"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "finite_number":
        return f"{key}: must be a finite number (got {err.get('input')!r})"
    if kind == "string_too_long":
        return f"{key}: at most {err['ctx']['max_length']} characters (got {len(err.get('input', ''))})"
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return f"{key}: {message} (got {err.get('input')!r})" if kind != "value_error" else f"{key}: {message}"


def check_consistency(spec: JobSpec) -> list[str]:
    """Checks across keys that field types cannot express; one line per problem."""
    return (check_schedule(spec.schedule, "schedule") + _check_optim(spec) + _check_model(spec) + _check_data(spec)
            + _check_scaling(spec.scaling) + check_space(spec.sweep.space) + _check_sweep(spec))


def _check_sweep(spec: JobSpec) -> list[str]:
    """What sweep.search and sweep.scheduler ask of the space."""
    sweep, problems = spec.sweep, []
    kinds = {key: next(iter(domain)) for key, domain in sweep.space.items() if isinstance(domain, dict) and domain}
    if sweep.search == "grid":
        problems += [f"sweep.space.{key}: search grid crosses lists of values; {kind} is a range (use grid or choice)"
                     for key, kind in kinds.items() if kind in RANGE_KINDS]
    if sweep.scheduler == "pbt":
        problems += [f"sweep.space.{key}: PBT changes values while a trial trains, and {key} cannot change then; "
                     f"perturbable: {', '.join(PERTURBABLE)}" for key in kinds if key not in PERTURBABLE]
        if sweep.search == "tpe":
            problems.append("sweep.search: tpe suggests whole trials; PBT draws its population at random and evolves it "
                            "(use search random or grid with scheduler pbt)")
        if sweep.pbt.perturbation_interval >= spec.schedule.epochs:
            problems.append(f"sweep.pbt.perturbation_interval: {sweep.pbt.perturbation_interval} epochs leaves no "
                            f"perturbation in schedule.epochs ({spec.schedule.epochs})")
    return problems


def check_schedule(sched: ScheduleSpec, where: str) -> list[str]:
    """The cross-key checks of one schedule (the job's, or a parameter group's at `where`)."""
    problems = []
    if sched.warmup_epochs >= sched.epochs:
        problems.append(f"{where}.warmup_epochs: {sched.warmup_epochs} must be shorter than schedule.epochs ({sched.epochs})")
    if sched.name == "multistep":
        ms = sched.milestones
        if not ms:
            problems.append(f"{where}.milestones: multistep needs at least one milestone (epochs)")
        elif any(b <= a for a, b in zip(ms, ms[1:])):
            problems.append(f"{where}.milestones: must be strictly increasing (got {ms})")
        elif ms[0] < 1:
            problems.append(f"{where}.milestones: epochs must be >= 1 (got {ms})")
    if sched.name == "lambda":
        problem = check_expression(sched.expression, sched.epochs)
        if problem:
            problems.append(f"{where}.expression: {problem}")
    if sched.name == "onecycle" and sched.warmup_epochs > 0:
        problems.append(f"{where}.warmup_epochs: onecycle rises by itself over pct_start of the steps; set it to 0")
    return problems


def _check_group_schedules(spec: JobSpec) -> list[str]:
    problems = []
    for i, group in enumerate(spec.optim.param_groups):
        where = f"optim.param_groups.{i}.schedule"
        if not group.schedule:
            continue
        if "epochs" in group.schedule:
            problems.append(f"{where}.epochs: every group trains for schedule.epochs; leave it out")
            continue
        try:
            problems += check_schedule(group_schedule(spec.schedule, group.schedule), where)
        except ValidationError as exc:
            problems += [f"{where}.{format_error(e)}" for e in exc.errors()]
    return problems


def _check_optim(spec: JobSpec) -> list[str]:
    optim, sched = spec.optim, spec.schedule
    problems = []
    if optim.nesterov and (not OPTIMIZERS[optim.name].nesterov or optim.momentum <= 0):
        takers = " or ".join(name for name, info in OPTIMIZERS.items() if info.nesterov)
        problems.append(f"optim.nesterov: needs optim.name {takers} with momentum > 0")
    if optim.switch_to_sgd_at_epoch is not None:
        if not OPTIMIZERS[optim.name].swats:
            switchable = "/".join(name for name, info in OPTIMIZERS.items() if info.swats)
            problems.append(f"optim.switch_to_sgd_at_epoch: switches from {switchable} to SGD, but optim.name is {optim.name!r}")
        if optim.switch_to_sgd_at_epoch >= sched.epochs:
            problems.append(f"optim.switch_to_sgd_at_epoch: {optim.switch_to_sgd_at_epoch} must be before schedule.epochs ({sched.epochs})")
    for i, group in enumerate(optim.param_groups):
        if not group.match.strip():
            problems.append(f"optim.param_groups.{i}.match: must not be empty")
    return problems + _check_group_schedules(spec)


def _check_model(spec: JobSpec) -> list[str]:
    model, epochs = spec.model, spec.schedule.epochs
    problems = []
    if model.unfreeze_at_epoch is not None:
        if not model.freeze:
            problems.append("model.unfreeze_at_epoch: set, but model.freeze is empty")
        if model.unfreeze_at_epoch >= epochs:
            problems.append(f"model.unfreeze_at_epoch: {model.unfreeze_at_epoch} must be before schedule.epochs ({epochs})")
        if model.unfreeze:
            problems.append("model.unfreeze_at_epoch: give either it or model.unfreeze, not both")
    if model.unfreeze:
        at = [step.at_epoch for step in model.unfreeze]
        if not model.freeze:
            problems.append("model.unfreeze: set, but model.freeze is empty")
        if any(b <= a for a, b in zip(at, at[1:])):
            problems.append(f"model.unfreeze: at_epoch must be strictly increasing (got {at})")
        if at[-1] >= epochs:
            problems.append(f"model.unfreeze: at_epoch {at[-1]} must be before schedule.epochs ({epochs})")
    if "backbone" in model.freeze and len(model.freeze) > 1:
        problems.append("model.freeze: [backbone] already freezes everything but the head; list it alone")
    if model.zero_init_residual and not model.arch.startswith(ZERO_INIT_RESIDUAL_FAMILIES):
        problems.append(f"model.zero_init_residual: {model.arch} has no torchvision residual blocks to zero; "
                        f"it applies to {', '.join(f + '*' for f in ZERO_INIT_RESIDUAL_FAMILIES)}")
    return problems


def _check_data(spec: JobSpec) -> list[str]:
    data = spec.data
    problems = []
    if data.source == "synthetic" and data.classes is not None:
        bad = [c for c in data.classes if not isinstance(c, int) or not 0 <= c < data.synthetic.num_classes]
        if bad:
            problems.append(f"data.classes: synthetic labels are 0..{data.synthetic.num_classes - 1} (got {bad})")
    if data.classes is not None and len(set(data.classes)) < 2:
        problems.append("data.classes: keep at least two distinct classes")
    streams = SOURCES[data.source_kind].streams
    if streams and (data.classes is not None or data.max_per_class is not None):
        problems.append(f"data.classes / data.max_per_class: not available with {data.source_kind}: (they stream); "
                        "pack what you want to train on")
    if data.decode == "gpu" and (data.source_kind != "shards" or data.loader != "torch"):
        problems.append("data.decode: gpu decodes packed shards read by data.loader: torch; pack the images "
                        f"(orchestrator pack) for data.source: shards: (now {data.source}, loader {data.loader})")
    if data.decode == "gpu" and (data.mixup_alpha > 0 or data.cutmix_alpha > 0):
        problems.append("data.decode: gpu does not mix batches yet; set data.mixup_alpha and data.cutmix_alpha to 0")
    if streams and data.sampler == "balanced":
        problems.append(f"data.sampler: balanced draws images by index; {data.source_kind}: streams them in packed order "
                        "(use loss.class_weights: balanced, or an imagefolder source)")
    if streams and spec.loss.class_weights == "balanced":
        problems.append(f"loss.class_weights: balanced counts the train split's labels, which {data.source_kind}: does "
                        "not hold in memory; give one weight per class as a list")
    if data.loader == "ray_data" and not streams:
        problems.append(f"data.loader: ray_data reads packed shards; data.source is {data.source} (orchestrator pack it first)")
    if data.loader == "ray_data" and spec.run.checkpoint_every_steps is not None:
        problems.append("run.checkpoint_every_steps: a mid-epoch resume needs data.loader: torch (Ray Data's order is "
                        "not a function of seed and epoch)")
    names = [augmentation_entry(entry)[0] for entry in data.augment]
    if "random_resized_crop" in names and "random_crop" in names:
        problems.append("data.augment: choose one of random_resized_crop and random_crop")
    if data.eval_resize is not None and data.eval_resize < data.image_size:
        problems.append(f"data.eval_resize: {data.eval_resize} is smaller than data.image_size ({data.image_size}); "
                        "the center crop of image_size is taken from the resized image")
    return problems


def _check_scaling(scaling: ScalingSpec) -> list[str]:
    problems = []
    if scaling.sync_bn and not scaling.use_gpu:
        problems.append("scaling.sync_bn: torch's SyncBatchNorm runs on GPUs only; set scaling.use_gpu or drop sync_bn")
    if scaling.amp == "fp16" and not scaling.use_gpu:
        problems.append("scaling.amp: fp16 needs use_gpu (on CPU use bf16)")
    return problems


def check_space(space: dict[str, dict[str, Any]]) -> list[str]:
    """One line per problem of sweep.space: keys that are not job keys, unknown kinds, bad arguments."""
    search_kinds = list(SEARCH_KINDS)
    problems = []
    defaults = JobSpec().to_dict()
    for key, domain in space.items():
        where = f"sweep.space.{key}"
        if lookup(defaults, key) is MISSING:
            problems.append(f"{where}: not a job-file key{did_you_mean(key, leaf_keys(defaults))}")
        if not isinstance(domain, dict) or len(domain) != 1:
            problems.append(f"{where}: give exactly one of {', '.join(search_kinds)}")
            continue
        (kind, args), = domain.items()
        if kind not in search_kinds:
            problems.append(f"{where}: unknown search kind {kind!r}{did_you_mean(kind, search_kinds)}; valid: {', '.join(search_kinds)}")
        elif kind in RANGE_KINDS:
            if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args) and args[0] < args[1]):
                problems.append(f"{where}.{kind}: needs [low, high] with low < high (got {args!r})")
            elif kind == "loguniform" and args[0] <= 0:
                problems.append(f"{where}.loguniform: bounds must be > 0 (got {args!r})")
        elif not (isinstance(args, list) and args):
            problems.append(f"{where}.{kind}: needs a non-empty list of values (got {args!r})")
    return problems
