"""Every name a job file may use, as plain data, with what each named thing can do: the spec's
validation reads this module, so reading and checking a job file imports no torch or torchvision
(~3 s here, which `train` then spends while Ray starts instead of before it).

Each table mirrors a registry that sits beside the code building its entries, and that registry
calls `same_names` at import, so the two cannot drift apart: `HEAD_INIT_NAMES` = `train.models.HEAD_INITS`,
`OPTIMIZERS` = `train.optim.OPTIMIZERS`, `SOURCES` = `data.sources.READERS`, `AUGMENTATIONS` =
`data.augment.AUGMENTATIONS` (names and arguments), `DECAY_NAMES` = `config.schedule.DECAYS`,
`SEARCH_KINDS` = `cluster.suggest.SEARCH_SPACES`, `EXPORT_FORMATS` = `after.export.WRITERS`.
`ARCH_NAMES` lists torchvision's classification models (0.29); an architecture a newer torchvision
adds is checked against torchvision itself (`train.models.check_arch`). `timm_arch_names` reads timm's
model names (`model.arch: timm/<name>`) from `timm_names.txt` (tools/make_timm_names.py writes it).
Imports nothing of orchestrator.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources


def same_names(registry: Iterable[str], names: Iterable[str], what: str) -> None:
    """Raise at import when a builder registry and its catalog table name different things."""
    built, listed = set(registry), set(names)
    if built != listed:
        raise RuntimeError(f"{what} and config.catalog disagree: only built {sorted(built - listed)}, "
                           f"only listed {sorted(listed - built)}")


@dataclass(frozen=True)
class OptimInfo:
    """What an optimizer takes, as timm's OptimInfo says it: the spec's checks and the plan read these."""

    momentum: bool = False
    """takes optim.momentum"""
    nesterov: bool = False
    """takes optim.nesterov (with momentum > 0)"""
    betas: bool = False
    """takes optim.betas"""
    swats: bool = False
    """optim.switch_to_sgd_at_epoch can switch it to SGD (an Adam-family optimizer)"""
    recipe_keys: tuple[str, ...] = ()
    """optim keys of its own that the plan's recipe line shows (e.g. lars: trust_coeff)"""


OPTIMIZERS = {
    "sgd": OptimInfo(momentum=True, nesterov=True),
    "adam": OptimInfo(betas=True, swats=True),
    "adamw": OptimInfo(betas=True, swats=True),
    "rmsprop": OptimInfo(momentum=True),
    "adagrad": OptimInfo(),
    "adadelta": OptimInfo(),
    "lars": OptimInfo(momentum=True, nesterov=True, recipe_keys=("trust_coeff",)),
    "lamb": OptimInfo(betas=True),
}
"""optim.name -> what it takes"""
OPTIMIZER_NAMES = tuple(OPTIMIZERS)


@dataclass(frozen=True)
class SourceInfo:
    """A `data.source` kind: how a job file writes it and what it allows."""

    form: str
    """how a job file writes it"""
    takes_path: bool
    """the part after ':' is a local path or URI"""
    in_memory: bool = False
    """its images are decoded arrays held in memory: no loader processes by default"""
    streams: bool = False
    """read from storage as the loaders go, never held: no data.classes or data.max_per_class (pack what
    you want), and Ray Data can read it (data.loader: ray_data)"""


SOURCES = {
    "builtin": SourceInfo("builtin:digits", takes_path=False, in_memory=True),
    "imagefolder": SourceInfo("imagefolder:PATH", takes_path=True),
    "parquet": SourceInfo("parquet:PATH_OR_URI", takes_path=True),
    "shards": SourceInfo("shards:PATH_OR_URI", takes_path=True, streams=True),
    "synthetic": SourceInfo("synthetic", takes_path=False, in_memory=True),
}
"""data.source kinds (the part before ':')"""


def source_entry(source: str) -> SourceInfo | None:
    """The catalog entry a data.source value names, or None when it names none."""
    kind, _, rest = source.partition(":")
    entry = SOURCES.get(kind)
    if entry is None or (rest == "" if entry.takes_path else source != entry.form):
        return None
    return entry


AUGMENTATIONS = {
    "hflip": ("p",),
    "vflip": ("p",),
    "rotate90": (),
    "rotate": ("degrees",),
    "color_jitter": ("brightness", "contrast", "saturation", "hue"),
    "random_resized_crop": ("scale", "ratio"),
    "random_crop": ("padding",),
    "blur": ("kernel_size", "sigma", "p"),
    "gaussian_noise": ("sigma",),
    "random_erasing": ("p", "scale"),
    "randaugment": ("num_ops", "magnitude"),
    "trivialaugment": (),
    "autoaugment": ("policy",),
}
"""data.augment names -> the arguments each takes (besides the image size)"""
FLOAT_ONLY_AUGMENTATIONS = ("gaussian_noise",)
"""augmentations of float images: the conversion to float moves before the first of them"""


def augmentation_entry(entry: str | dict) -> tuple[str, dict]:
    """(name, arguments) of a data.augment entry: a name, or a mapping with `name` and the arguments."""
    if isinstance(entry, str):
        return entry, {}
    arguments = dict(entry)
    return arguments.pop("name", None), arguments


DECAY_NAMES = ("constant", "step", "multistep", "exponential", "cosine", "plateau", "lambda", "onecycle", "poly")
"""schedule.name values"""
WATCHABLE = {"val_acc1": "max", "val_acc5": "max", "val_balanced_acc": "max", "val_macro_f1": "max", "val_loss": "min",
             "train_loss": "min"}
"""metric -> the direction that is better; what sweep.metric and schedule.plateau_metric may name"""
SEARCH_KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
"""sweep.space kinds"""
SEARCHES = ("random", "grid", "tpe")
"""sweep.search values: sample the space at random (grid kinds expanded), the whole space as a grid, Optuna's TPE"""
PERTURBABLE = ("optim.base_lr", "optim.weight_decay", "optim.momentum", "optim.grad_clip_norm", "data.mixup_alpha",
               "data.cutmix_alpha", "loss.label_smoothing")
"""keys that may change while a run trains (a resume takes them from the job): what sweep.scheduler: pbt perturbs"""
TRIAL_MEASURES = {"params": "min", "latency_ms": "min"}
"""sweep.objectives besides WATCHABLE: measured once per trial on its eval model (parameters; ms per image at
batch 1 on CPU)"""
RANGE_KINDS = ("loguniform", "uniform", "randint")
"""the kinds that take [low, high]; the others take a list of values"""
EXPORT_FORMATS = ("onnx", "pt2", "safetensors")
"""orchestrator export --format values"""
HEAD_INIT_NAMES = ("default", "kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform")
ZERO_INIT_RESIDUAL_FAMILIES = ("resnet", "resnext", "wide_resnet")
"""torchvision families built of BasicBlock/Bottleneck, whose constructor takes zero_init_residual"""
TIMM_PREFIX = "timm/"
"""model.arch `timm/<name>`: a model of timm's zoo"""


@functools.cache
def timm_arch_names() -> frozenset[str]:
    """timm.list_models() of the timm this list was written from (timm_names.txt), read without importing timm."""
    text = (resources.files("orchestrator.config") / "timm_names.txt").read_text()
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))


ARCH_NAMES = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121", "densenet161",
    "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m",
    "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf",
    "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf",
    "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf",
    "resnet101", "resnet152", "resnet18", "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d",
    "resnext50_32x4d", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11",
    "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14",
    "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2",
)
