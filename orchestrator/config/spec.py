"""The typed job spec: the sections a job file may have, their keys, units and defaults.

Each section is a pydantic model (unknown keys are errors); each field's docstring says what it
means and its unit (`docs/job-file.md` is generated from them). Names a key may take are checked
against `config.catalog`, so importing and validating this module imports no torch or Ray. The
checks across keys live in `config.checks`, reading a file and `--set` in `config.jobfile`. The run and
sweep sections are in `config.run_spec`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from orchestrator.config.catalog import (AUGMENTATIONS, DECAY_NAMES, HEAD_INIT_NAMES, OPTIMIZER_NAMES, SOURCES,
                                         WATCHABLE, augmentation_entry, source_entry)
from orchestrator.config.errors import did_you_mean, one_of
from orchestrator.config.run_spec import AshaSpec, MlflowSpec, RunSpec, ScalingSpec, SweepSpec, WorkerRange  # noqa: F401 (their home is run_spec)
from orchestrator.config.section import _Section, named


def check_augmentation(entry, index: int) -> None:
    """ValueError saying what is wrong with data.augment entry `index`: not a name or mapping, an unknown
    name, or arguments it does not take (`catalog.AUGMENTATIONS`)."""
    if not isinstance(entry, (str, dict)):
        raise ValueError(f"entry {index} must be a name or a mapping with a name (got {entry!r})")
    name, arguments = augmentation_entry(entry)
    if not isinstance(name, str):
        raise ValueError(f"entry {index} has no name (e.g. {{name: color_jitter, brightness: 0.2}})")
    one_of(name, list(AUGMENTATIONS), "augmentation")
    takes = AUGMENTATIONS[name]
    unknown = [key for key in arguments if key not in takes]
    if unknown:
        raise ValueError(f"entry {index} ({name}): takes no {', '.join(map(repr, unknown))}"
                         f"{did_you_mean(unknown[0], takes)}; its arguments: {', '.join(takes) or 'none'}")


class SyntheticSpec(_Section):
    """Generated images for benchmarks and tests (`data.source: synthetic`)."""

    kind: Literal["patterns", "glyphs"] = "patterns"
    """patterns: a random pattern per class plus noise (easy); glyphs: a letter per class drawn at a random
    size, angle, place and colour on clutter, with noise (learnable, not trivial)"""
    num_classes: int = Field(10, ge=2)
    """`synthetic`: classes"""
    train_samples: int = Field(512, ge=1)
    """generated training images"""
    val_samples: int = Field(128, ge=0)
    """generated validation images"""
    test_samples: int = Field(128, ge=0)
    """generated test images"""
    noise_std: float = Field(12.0, ge=0)
    """glyphs: standard deviation of the gaussian pixel noise, in 0-255 pixel units (harder when larger)"""
    clutter_strokes: int = Field(2, ge=0)
    """glyphs: random lines drawn behind each glyph (harder when more)"""


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
    decode: Literal["cpu", "gpu"] = "cpu"
    """where packed shards' training JPEGs are decoded: cpu (loader processes), or gpu: the loaders only read,
    and each batch is decoded on the training device in one call (torchvision's batched decode_jpeg), then
    cropped and flipped there; with scaling.use_gpu and shards:, not with MixUp/CutMix"""
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    """shuffle: every image once an epoch; balanced: each epoch draws as many images with replacement, each class
    equally often in expectation (seeded by seed and epoch: the global batch, resume and seeding hold)"""
    loader_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes per training worker, alive for the whole run; auto: 0 for in-memory
    data, else picked at start from a short measurement of a batch's decode+augment against a step's
    (0, in-process, where that is fastest), at most scaling.cpus_per_worker - 1; the run says what and why"""
    classes: list[int | str] | None = None
    """keep only these labels (indices or class names); None keeps all"""
    max_per_class: int | None = Field(None, ge=1)
    """few-shot: at most this many training images per class (seeded choice)"""
    on_bad_image: Literal["error", "skip"] = "error"
    """an image folder's files are all checked before training: error lists every unreadable one and
    stops (exit 2); skip leaves them out, says how many and lists them in the run folder's bad_images.txt"""
    exif_transpose: bool = True
    """turn images upright by their EXIF orientation (phone photos) in training, evaluation, predict and pack"""
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
    """per-channel mean subtracted after scaling to [0, 1] (ImageNet's by default)"""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """per-channel standard deviation divided by after the mean (ImageNet's by default)"""
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)
    """the generated images of data.source: synthetic"""

    @field_validator("loader_workers", mode="before")
    @classmethod
    def _null_is_auto(cls, value):
        """null (what this key took before auto existed) means auto."""
        return "auto" if value is None else value

    @field_validator("augment")
    @classmethod
    def _known_augmentations(cls, entries: list) -> list:
        for index, entry in enumerate(entries):
            check_augmentation(entry, index)
        return entries

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source_entry(source) is None:
            raise ValueError(f"unknown data source {source!r}; valid: {', '.join(s.form for s in SOURCES.values())}")
        return source

    @property
    def source_kind(self) -> str:
        """the part before ':' (builtin | imagefolder | parquet | shards | synthetic): a key of catalog.SOURCES"""
        return self.source.partition(":")[0]

    @property
    def source_path(self) -> str:
        return self.source.partition(":")[2]


class CompileSpec(_Section):
    """torch.compile of the model (`model.compile: {mode: ...}`)."""

    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode: reduce-overhead adds CUDA graphs, max-autotune tries kernel variants (slow to compile)"""
    backend: str = "inductor"
    """inductor generates kernels (a C++ compiler on CPU, Triton on GPU); aot_eager only traces (no speed-up)"""
    fullgraph: bool = False
    """refuse graph breaks (an error instead of falling back to Python between graphs)"""
    dynamic: bool | None = None
    """compile for varying shapes: None decides after a shape changes, false never"""


class UnfreezeStep(_Section):
    at_epoch: int = Field(ge=1)
    """epoch (0-based) from which these modules train"""
    modules: list[str] = Field(min_length=1)
    """module-name prefixes or globs ('layer4', 'features.1*', '*' for everything still frozen)"""


class ModelSpec(_Section):
    arch: str = "resnet18"
    """any torchvision classification model name, or timm/<name> for any of timm.list_models() (docs/fine-tuning.md)"""
    weights: str | None = None
    """null | DEFAULT | torchvision weight name | run folder | a weights file of any tool (torchvision's
    references, timm, Lightning, plain state dicts, safetensors; .pth, .pt, .pth.tar, .ckpt, .bin, ...), read by content"""
    weights_ema: bool | Literal["auto"] = "auto"
    """take the EMA weights of model.weights (model_ema, state_dict_ema, ...): auto when the file holds them
    (and say so), true requires them, false takes the trained model's"""
    num_classes: int | Literal["auto"] = "auto"
    """classes of the new head; `auto` counts them in the data"""
    head_init: str = "kaiming_normal"
    """init of new layers: a name of catalog.HEAD_INIT_NAMES"""
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
    drop_path_rate: float | None = Field(None, ge=0, lt=1)
    """stochastic depth: the chance a residual branch is dropped (deepest block; timm's drop_path_rate,
    torchvision's stochastic_depth_prob for convnext, efficientnet, swin, maxvit); null: the model's default"""
    zero_init_residual: bool = False
    """zero the last BatchNorm gamma of every residual block that got no weights (Goyal et al. 2017): each
    block starts as the identity; torchvision ResNet, ResNeXt and Wide ResNet"""
    compile: bool | CompileSpec = False
    """torch.compile the model's forward in place (checkpoints and exports keep plain names): true, or
    {mode, backend, fullgraph, dynamic}; the first step pays the compilation (about 1.5 min for resnet18 on 2 CPUs)"""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """keep an exponential moving average of the weights (and BN statistics), updated every optimizer step;
    it is what is evaluated each epoch, checkpointed as best, tested and exported; None = off"""

    _known_init = named("head_init", HEAD_INIT_NAMES)

    @field_validator("arch")
    @classmethod
    def _an_arch_name(cls, arch: str) -> str:
        """Any name: catalog.ARCH_NAMES pass here; others are checked against torchvision by
        train.models.check_arch, which validate, plan, train and submit run (it imports torch)."""
        if not arch.strip():
            raise ValueError("must name an architecture, e.g. resnet18")
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
    class_weights: Literal["none", "balanced"] | list[Annotated[float, Field(gt=0)]] = "none"
    """weights of the classes in the training loss: none, balanced (images / (classes x the class's images) of
    the train split, as sklearn's), or one positive number per class in class order; the plan shows them"""


class ParamGroupSpec(_Section):
    match: str
    """glob over parameter names, e.g. 'fc.*' or 'layer4.*'"""
    lr_mult: float = Field(1.0, gt=0)
    """this group's LR = lr_mult x the scaled LR (e.g. 10 for a new head)"""
    weight_decay: float | None = Field(None, ge=0)
    """None: the optimizer's weight_decay"""
    schedule: dict[str, Any] | None = None
    """schedule keys that differ for this group, e.g. {name: constant}; None: the job's schedule"""


class OptimSpec(_Section):
    name: str = "sgd"
    """a name of catalog.OPTIMIZERS"""
    base_lr: float = Field(0.1, gt=0)
    """the LR at base_batch_size images per optimizer step"""
    base_batch_size: int = Field(256, ge=1)
    """images per step at which `base_lr` holds"""
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    """`linear`, `sqrt`, `none` (see above)"""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD and RMSprop momentum"""
    nesterov: bool = False
    """Nesterov momentum (SGD, LARS)"""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam-family (adam, adamw, lamb) moment decays (beta1, beta2); SWATS uses beta2 for its estimate"""
    eps: float = Field(1e-8, gt=0)
    """added to the denominator of adaptive optimizers"""
    weight_decay: float = Field(1e-4, ge=0)
    """L2 (decoupled for AdamW)"""
    norm_bias_weight_decay: float | None = Field(0.0, ge=0)
    """weight decay of norm layers and biases; None = same as weight_decay"""
    param_groups: list[ParamGroupSpec] = Field(default_factory=list)
    """first match wins; unmatched parameters get lr_mult 1"""
    switch_to_sgd_at_epoch: int | None = Field(None, ge=1)
    """SWATS: switch adam/adamw to SGD at this epoch, LR estimated from the Adam steps"""
    grad_clip_norm: float | None = Field(None, gt=0)
    """clip the global gradient norm to this value; None = no clipping"""
    layer_decay: float | None = Field(None, gt=0, le=1)
    """per-layer LR factors from the head down (BEiT, timm --layer-decay): layer d of L trains at
    layer_decay ** (L - 1 - d) x its group's LR; null: every layer at its group's LR"""
    trust_coeff: float = Field(0.001, gt=0)
    """lars: the trust coefficient eta of the layer-wise LR (You et al. 2017)"""

    _known_optimizer = named("name", OPTIMIZER_NAMES)


class EarlyStoppingSpec(_Section):
    """Stop a run whose metric has stopped improving (HF EarlyStoppingCallback, Keras EarlyStopping)."""

    metric: str = "val_loss"
    """the metric watched (a name of catalog.WATCHABLE; its better direction is the catalog's)"""
    patience: int = Field(3, ge=1)
    """epochs without an improvement after which the run stops"""
    min_delta: float = Field(0.0, ge=0)
    """an improvement is a change in the better direction larger than this (in the metric's units)"""

    _known_metric = named("metric", WATCHABLE, "metric")


class ScheduleSpec(_Section):
    name: str = "cosine"
    """a name of catalog.DECAY_NAMES"""
    epochs: int = Field(10, ge=1)
    """training epochs"""
    warmup_epochs: float = Field(0.0, ge=0)
    """linear ramp from warmup_start_factor x scaled_lr to scaled_lr, per step"""
    warmup_start_factor: float = Field(0.1, gt=0, le=1)
    """warmup starts at this fraction of the peak LR"""
    step_size: int = Field(30, ge=1)
    """step: epochs between decays"""
    milestones: list[int] = Field(default_factory=lambda: [30, 60, 80])
    """multistep: epochs at which the LR is multiplied by gamma"""
    gamma: float = Field(0.1, gt=0, le=1)
    """decay factor of step, multistep, exponential (per epoch) and plateau"""
    patience: int = Field(2, ge=0)
    """plateau: epochs without improvement before a decay"""
    plateau_metric: str = "val_loss"
    """plateau: the metric watched (a name of catalog.WATCHABLE)"""
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
    early_stopping: EarlyStoppingSpec | None = None
    """{metric, patience, min_delta}: stop when the metric has not improved for `patience` epochs; the best
    weights are kept and evaluated; null: train every epoch"""

    _known_schedule = named("name", DECAY_NAMES)
    _known_metric = named("plateau_metric", WATCHABLE, "metric")


NAME_MAX_CHARS = 100
"""a run name is a folder name, and checkpoint paths below it must stay under the filesystem's 255 bytes"""


class JobSpec(_Section):
    name: str = Field("run", max_length=NAME_MAX_CHARS)
    """run folder name (letters, digits, `.`, `_`, `-`; at most 100 characters): the run lives in `<run.storage>/<name>/`"""
    seed: int = Field(0, ge=0, lt=2**32)
    """numpy takes seeds in [0, 2**32)"""
    data: DataSpec = Field(default_factory=DataSpec)
    """what trains: the source, its splits, image size, augmentation, loaders"""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """the architecture, its weights, head and freezing"""
    loss: LossSpec = Field(default_factory=LossSpec)
    """the training loss"""
    optim: OptimSpec = Field(default_factory=OptimSpec)
    """the optimizer, its LR at base_batch_size and how it scales, parameter groups"""
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    """the LR schedule: epochs, warmup, decay"""
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    """workers, batch sizes, accumulation, precision"""
    run: RunSpec = Field(default_factory=RunSpec)
    """where the run folder lives, checkpoints, failures"""
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    """read by orchestrator sweep: the metric, the trials, ASHA and the search space"""

    @field_validator("name")
    @classmethod
    def _folder_safe(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError("must be a folder name: letters, digits, '.', '_', '-'")
        return name

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict of every key (defaults included)."""
        return self.model_dump(mode="json")
