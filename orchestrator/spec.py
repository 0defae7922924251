"""The typed job spec: what a job file may say, its defaults, and every check on it.

`load_spec(path, overrides)` reads a YAML job file, applies `--set a.b=value` overrides (values
typed as YAML), and returns a validated `JobSpec`, or raises `SpecError` whose `.problems` holds one
line per problem, each naming the key ("optim.base_lr: must be > 0"). Unknown keys are errors
with a "did you mean". Nothing here imports torch or ray.
"""

from __future__ import annotations

import difflib
import importlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

class SpecError(Exception):
    """A job file that cannot run. `problems` holds one human line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def one_of(value: str, names, what: str = "value") -> str:
    """`value` when it is one of `names`, else ValueError listing them (with a "did you mean")."""
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}{did_you_mean(value, names)}; valid: {', '.join(names)}")
    return value


def registered(field: str, module: str, registry: str, what: str = "value"):
    """A validator of `field`: its value must be a key of orchestrator.<module>.<registry>.

    The registry sits next to the code that builds its entries; it is imported when a spec is first
    validated, so importing this module stays free of torch.
    """
    def check(cls, value: str) -> str:
        names = getattr(importlib.import_module(f"orchestrator.{module}"), registry)
        return one_of(value, list(names), what)

    return field_validator(field)(classmethod(check))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


class SyntheticSpec(_Section):
    """Generated images for benchmarks and tests (`data.source: synthetic`)."""

    kind: Literal["patterns", "glyphs"] = "patterns"
    """patterns: a random pattern per class plus noise (easy); glyphs: a letter per class drawn at a random
    size, angle, place and colour on clutter, with noise (learnable, not trivial)"""
    num_classes: int = Field(10, ge=2)
    train_samples: int = Field(512, ge=1)
    val_samples: int = Field(128, ge=0)
    test_samples: int = Field(128, ge=0)


class DataSpec(_Section):
    source: str = "builtin:digits"
    """builtin:digits | imagefolder:PATH | parquet:PATH_OR_URI | shards:PATH_OR_URI (orchestrator pack) | synthetic"""
    loader: Literal["torch", "ray_data"] = "torch"
    """who reads and decodes training images: torch DataLoader workers beside each trainer, or Ray Data
    (map_batches tasks anywhere in the cluster, streaming_split to the trainers); ray_data needs shards:"""
    image_size: int = Field(32, ge=8, le=4096)
    """side of the square images the model sees, pixels"""
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    """share of train held out for validation when the source has no val split (stratified, seeded)"""
    augment: list[str | dict[str, Any]] = Field(default_factory=list)
    """training augmentations in the order written: a name, or {name: NAME, <its arguments>}"""
    loader_workers: int | None = Field(None, ge=0)
    """DataLoader worker processes per training worker; None: 0 for builtin/synthetic data, else
    scaling.cpus_per_worker - 1 (decoding is the work)"""
    classes: list[int | str] | None = None
    """keep only these labels (indices or class names); None keeps all"""
    max_per_class: int | None = Field(None, ge=1)
    """few-shot: at most this many training images per class (seeded choice)"""
    num_train_samples: int | None = Field(None, ge=1)
    """training-set size for planning when the data is not on this machine"""
    eval_resize: int | None = Field(None, ge=8, le=4096)
    """evaluation: resize the short side to this many pixels, then center-crop image_size (256 -> 224 as in
    the ImageNet recipes); None: resize straight to image_size"""
    mixup_alpha: float = Field(0.0, ge=0)
    """MixUp's Beta(alpha, alpha) on training batches (torchvision v2 MixUp); 0 = off"""
    cutmix_alpha: float = Field(0.0, ge=0)
    """CutMix's Beta(alpha, alpha) (torchvision v2 CutMix); 0 = off; with mixup too, one of them per batch"""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)

    @field_validator("augment")
    @classmethod
    def _known_augmentations(cls, entries: list) -> list:
        from orchestrator.data.augment import check_augmentation

        for index, entry in enumerate(entries):
            check_augmentation(entry, index)
        return entries

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        from orchestrator.data.sources import SOURCES, source_entry

        if source_entry(source) is None:
            raise ValueError(f"unknown data source {source!r}; valid: {', '.join(s.form for s in SOURCES.values())}")
        return source

    @property
    def source_kind(self) -> str:
        """the part before ':' (builtin | imagefolder | parquet | synthetic): a key of data.sources.SOURCES"""
        return self.source.partition(":")[0]

    @property
    def source_path(self) -> str:
        return self.source.partition(":")[2]


class UnfreezeStep(_Section):
    at_epoch: int = Field(ge=1)
    """epoch (0-based) from which these modules train"""
    modules: list[str] = Field(min_length=1)
    """module-name prefixes or globs ('layer4', 'features.1*', '*' for everything still frozen)"""


class ModelSpec(_Section):
    arch: str = "resnet18"
    """any torchvision classification model name"""
    weights: str | None = None
    """null | DEFAULT | torchvision weight name | .pth/.pt/.safetensors file | run folder"""
    num_classes: int | Literal["auto"] = "auto"
    head_init: str = "kaiming_normal"
    """init of new layers: a name of models.HEAD_INITS (catalog.HEAD_INIT_NAMES)"""
    keep_head: bool = False
    """keep the source weights' classifier head (continue on the same classes); false: the head is new"""
    weights_prefix: str | None = None
    """take only the weights' keys under this prefix, prefix removed (common wrapper prefixes are stripped anyway)"""
    min_backbone_loaded: float = Field(0.5, ge=0, le=1)
    """share of the backbone's tensors that must load from model.weights, else exit 2; 0 accepts any"""
    freeze: list[str] = Field(default_factory=list)
    """module-name prefixes or globs to freeze, or [backbone] for everything but the head"""
    unfreeze_at_epoch: int | None = Field(None, ge=1)
    """epoch (0-based) at which all frozen modules start training (shorthand for one model.unfreeze step)"""
    unfreeze: list[UnfreezeStep] = Field(default_factory=list)
    """gradual unfreezing: [{at_epoch, modules}], in epoch order"""
    train_bn: bool = True
    """frozen BatchNorm layers still update their running statistics (fastai's train_bn); false: eval mode"""
    dropout: float | None = Field(None, ge=0, lt=1)
    """classifier dropout for architectures that take one (alexnet, vgg, squeezenet, mobilenet, efficientnet, ...); None = its default"""
    zero_init_residual: bool = False
    """zero the last BatchNorm gamma of every residual block that got no weights (Goyal et al. 2017): each
    block starts as the identity; torchvision ResNet, ResNeXt and Wide ResNet"""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """keep an exponential moving average of the weights (and BN statistics), updated every optimizer step;
    it is what is evaluated each epoch, checkpointed as best, tested and exported; None = off"""

    _known_init = registered("head_init", "catalog", "HEAD_INIT_NAMES")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        from orchestrator.catalog import ARCH_NAMES

        if arch in ARCH_NAMES:
            return arch
        from orchestrator.models import classification_models

        names = classification_models()
        if arch not in names:
            raise ValueError(f"unknown architecture {arch!r}{did_you_mean(arch, names)}; valid: any of torchvision's "
                             f"{len(names)} classification models (resnet18, resnet50, vit_b_16, ...: "
                             "torchvision.models.list_models(module=torchvision.models))")
        return arch

    @field_validator("num_classes")
    @classmethod
    def _at_least_two(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 2:
            raise ValueError("must be >= 2 or 'auto'")
        return value


class LossSpec(_Section):
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """training cross-entropy against (1 - e) one-hot + e / classes (Szegedy et al. 2016); validation loss
    stays the plain cross-entropy"""


class ParamGroupSpec(_Section):
    match: str
    """glob over parameter names, e.g. 'fc.*' or 'layer4.*'"""
    lr_mult: float = Field(1.0, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    """None: the optimizer's weight_decay"""
    schedule: dict[str, Any] | None = None
    """schedule keys that differ for this group, e.g. {name: constant}; None: the job's schedule"""


class OptimSpec(_Section):
    name: str = "sgd"
    """a name of optim.OPTIMIZERS (catalog.OPTIMIZER_NAMES)"""
    base_lr: float = Field(0.1, gt=0)
    """the LR at base_batch_size images per optimizer step"""
    base_batch_size: int = Field(256, ge=1)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    norm_bias_weight_decay: float | None = Field(0.0, ge=0)
    """weight decay of norm layers and biases; None = same as weight_decay"""
    param_groups: list[ParamGroupSpec] = Field(default_factory=list)
    """first match wins; unmatched parameters get lr_mult 1"""
    switch_to_sgd_at_epoch: int | None = Field(None, ge=1)
    """SWATS: switch adam/adamw to SGD at this epoch, LR estimated from the Adam steps"""
    grad_clip_norm: float | None = Field(None, gt=0)
    """clip the global gradient norm to this value; None = no clipping"""
    trust_coeff: float = Field(0.001, gt=0)
    """lars: the trust coefficient eta of the layer-wise LR (You et al. 2017)"""

    _known_optimizer = registered("name", "catalog", "OPTIMIZER_NAMES")


class ScheduleSpec(_Section):
    name: str = "cosine"
    """a name of schedule.DECAYS"""
    epochs: int = Field(10, ge=1)
    warmup_epochs: float = Field(0.0, ge=0)
    """linear ramp from warmup_start_factor x scaled_lr to scaled_lr, per step"""
    warmup_start_factor: float = Field(0.1, gt=0, le=1)
    step_size: int = Field(30, ge=1)
    """step: epochs between decays"""
    milestones: list[int] = Field(default_factory=lambda: [30, 60, 80])
    """multistep: epochs at which the LR is multiplied by gamma"""
    gamma: float = Field(0.1, gt=0, le=1)
    """decay factor of step, multistep, exponential (per epoch) and plateau"""
    patience: int = Field(2, ge=0)
    """plateau: epochs without improvement before a decay"""
    plateau_metric: str = "val_loss"
    """plateau: the metric watched (a name of metrics.WATCHABLE)"""
    plateau_threshold: float = Field(1e-4, ge=0)
    """plateau: relative improvement that counts"""
    min_lr: float = Field(0.0, ge=0)
    """floor of the decayed LR at lr_mult 1 (cosine's end point), absolute"""
    expression: str | None = None
    """lambda: the LR factor as arithmetic of epoch and step (e.g. '0.95 ** epoch'), like LambdaLR's lambda"""
    pct_start: float = Field(0.25, gt=0, lt=1)
    """onecycle: share of the steps spent rising to scaled_lr"""
    div_factor: float = Field(25.0, ge=1)
    """onecycle: the LR starts at scaled_lr / div_factor"""
    final_div_factor: float = Field(1.0e4, ge=1)
    """onecycle: the LR ends at scaled_lr / (div_factor x final_div_factor)"""
    power: float = Field(1.0, gt=0)
    """poly: the factor is (1 - progress) ** power over the steps after warmup"""

    _known_schedule = registered("name", "schedule", "DECAYS")
    _known_metric = registered("plateau_metric", "metrics", "WATCHABLE", "metric")


class ScalingSpec(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    per_worker_batch_size: int = Field(32, ge=1)
    """images per worker per micro-step; global batch = this x num_workers x grad_accum_steps"""
    grad_accum_steps: int = Field(1, ge=1)
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    sync_bn: bool = False


class RunSpec(_Section):
    storage: str = "./runs"
    """local path or URI shared by all nodes; the run folder is <storage>/<name>/"""
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bitwise-repeatable on CPU, slower"""
    checkpoint_every_steps: int | None = Field(None, ge=1)
    """also checkpoint every this many optimizer steps inside an epoch (a killed run resumes at the next
    step); None: at epoch ends only"""


class AshaSpec(_Section):
    grace_period: int = Field(1, ge=1)
    """epochs every trial runs before it can be stopped"""
    reduction_factor: float = Field(3, gt=1)


class SweepSpec(_Section):
    metric: str = "val_acc1"
    """a name of metrics.WATCHABLE"""
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    asha: AshaSpec = Field(default_factory=AshaSpec)
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)

    _known_metric = registered("metric", "metrics", "WATCHABLE", "metric")


NAME_MAX_CHARS = 100
"""a run name is a folder name, and checkpoint paths below it must stay under the filesystem's 255 bytes"""


class JobSpec(_Section):
    name: str = Field("run", max_length=NAME_MAX_CHARS)
    seed: int = Field(0, ge=0, lt=2**32)
    """numpy takes seeds in [0, 2**32)"""
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)

    @field_validator("name")
    @classmethod
    def _folder_safe(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError("must be a folder name: letters, digits, '.', '_', '-'")
        return name

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict of every key (defaults included)."""
        return self.model_dump(mode="json")


def did_you_mean(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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


def _format_error(err: dict) -> str:
    loc = tuple(err["loc"])
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
    from orchestrator.search import check_space

    return (check_schedule(spec.schedule, "schedule") + _check_optim(spec) + _check_model(spec) + _check_data(spec)
            + _check_scaling(spec.scaling) + check_space(spec.sweep.space))


def check_schedule(sched: ScheduleSpec, where: str) -> list[str]:
    """The cross-key checks of one schedule (the job's, or a parameter group's at `where`)."""
    from orchestrator.schedule import check_expression

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


def group_schedule(sched: ScheduleSpec, override: dict[str, Any] | None) -> ScheduleSpec:
    """A parameter group's schedule: the job's with the group's keys replaced (validated when the job is)."""
    return sched if not override else ScheduleSpec.model_validate({**sched.model_dump(), **override})


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
            problems += [f"{where}.{_format_error(e)}" for e in exc.errors()]
    return problems


def _check_optim(spec: JobSpec) -> list[str]:
    optim, sched = spec.optim, spec.schedule
    problems = []
    if optim.nesterov and (optim.name not in ("sgd", "lars") or optim.momentum <= 0):
        problems.append("optim.nesterov: needs optim.name sgd or lars with momentum > 0")
    if optim.switch_to_sgd_at_epoch is not None:
        if optim.name not in ("adam", "adamw"):
            problems.append(f"optim.switch_to_sgd_at_epoch: switches from adam/adamw to SGD, but optim.name is {optim.name!r}")
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


ZERO_INIT_RESIDUAL_FAMILIES = ("resnet", "resnext", "wide_resnet")
"""torchvision families built of BasicBlock/Bottleneck, whose constructor takes zero_init_residual"""


def _check_data(spec: JobSpec) -> list[str]:
    data = spec.data
    problems = []
    if data.source == "synthetic" and data.classes is not None:
        bad = [c for c in data.classes if not isinstance(c, int) or not 0 <= c < data.synthetic.num_classes]
        if bad:
            problems.append(f"data.classes: synthetic labels are 0..{data.synthetic.num_classes - 1} (got {bad})")
    if data.classes is not None and len(set(data.classes)) < 2:
        problems.append("data.classes: keep at least two distinct classes")
    if data.source_kind == "shards" and (data.classes is not None or data.max_per_class is not None):
        problems.append("data.classes / data.max_per_class: not available with shards: (they stream); pack what you want to train on")
    if data.loader == "ray_data" and data.source_kind != "shards":
        problems.append(f"data.loader: ray_data reads packed shards; data.source is {data.source} (orchestrator pack it first)")
    if data.loader == "ray_data" and spec.run.checkpoint_every_steps is not None:
        problems.append("run.checkpoint_every_steps: a mid-epoch resume needs data.loader: torch (Ray Data's order is "
                        "not a function of seed and epoch)")
    from orchestrator.data.augment import augmentation_entry

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


MISSING = object()


def lookup(tree: Any, dotted: str) -> Any:
    """tree[a][b]... for the key 'a.b...', or MISSING."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return MISSING
        tree = tree[part]
    return tree


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        dotted = f"{prefix}{k}"
        keys.append(dotted)
        if isinstance(v, dict):
            keys += leaf_keys(v, dotted + ".")
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', value typed as YAML). Raises SpecError on a malformed one."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise SpecError([f"--set {text}: expected KEY=VALUE with a dotted key, e.g. optim.base_lr=0.01"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SpecError([f"--set {key}: value is not valid YAML ({exc.__class__.__name__})"]) from None
    return key.strip(), value


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the job dict with each dotted key of `values` set, sections created as needed."""
    import copy

    result = copy.deepcopy(raw)
    for dotted, value in values.items():
        node = result
        *sections, leaf = dotted.split(".")
        for part in sections:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return result


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `raw` with each `--set a.b=value` set."""
    return with_values(raw, dict(parse_override(text) for text in overrides))


def read_job_file(path: str | Path) -> dict[str, Any]:
    """The job file's mapping, or SpecError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"{path}: no such job file"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([f"{path}: YAML syntax error{where}: {problem}"]) from None
    except UnicodeDecodeError:
        raise SpecError([f"{path}: not a text file"]) from None
    if raw is None:
        raise SpecError([f"{path}: the job file is empty"])
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: the job file must be a mapping of sections (name, data, model, ...), got a {type(raw).__name__}"])
    return raw


def validate_spec(raw: dict[str, Any]) -> JobSpec:
    """A validated JobSpec from a plain dict, or SpecError listing every problem."""
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError([_format_error(e) for e in exc.errors()]) from None
    problems = check_consistency(spec)
    if problems:
        raise SpecError(problems)
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Job file + `--set` overrides -> validated JobSpec (or SpecError)."""
    return validate_spec(apply_overrides(read_job_file(path), overrides or []))


def check_references(spec: JobSpec) -> JobSpec:
    """The spec, or SpecError when what it names on this machine is not there (`model.weights`).

    Not part of `validate_spec`: `submit` sends jobs whose paths exist on the cluster, not here.
    """
    if spec.model.weights is not None:
        from orchestrator.weights import weights_problem

        problem = weights_problem(spec.model.weights, spec.model.arch)
        if problem:
            raise SpecError([problem])
    return spec


def check_transforms(spec: JobSpec) -> JobSpec:
    """The spec, or SpecError naming each data.augment entry whose transform refuses its values.

    Builds each transform once (imports torchvision, ~3 s here): kept out of `validate_spec` so that
    checking a job file stays light; `resolve_plan`, `validate` and `submit` run it.
    """
    from orchestrator.data.augment import check_augmentation_values

    problems = check_augmentation_values(spec.data.augment)
    if problems:
        raise SpecError(problems)
    return spec


def with_absolute_paths(spec: JobSpec) -> JobSpec:
    """A copy whose local paths (run.storage, a local data source, model.weights files and run
    folders) are absolute, so Ray workers, whose working directory is not the user's, find them."""
    from orchestrator.data.sources import SOURCES
    from orchestrator.storage import absolute_storage as _absolute

    data = spec.data
    source = data.source
    if SOURCES[data.source_kind].takes_path:
        source = f"{data.source_kind}:{_absolute(data.source_path)}"
    weights = spec.model.weights
    if weights is not None and (Path(weights).expanduser().exists() or weights.startswith((".", "/", "~"))
                                or Path(weights).suffix in (".pth", ".pt", ".safetensors")):
        weights = _absolute(weights)
    return spec.model_copy(update={
        "data": data.model_copy(update={"source": source}),
        "model": spec.model.model_copy(update={"weights": weights}),
        "run": spec.run.model_copy(update={"storage": _absolute(spec.run.storage)}),
    })


def spec_to_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)
