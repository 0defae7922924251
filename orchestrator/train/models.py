"""Model surgery: build any torchvision classifier for N classes, init new layers, freeze.

The head is found without a per-family table: the model is built on the meta device for two class
counts and the parameters whose shapes differ are the head (fc, classifier[-1], heads.head,
squeezenet's conv, inception's AuxLogits.fc, googlenet's aux heads). Reading and matching
pretrained weights is `weights.py`'s job; `build_model` puts the pieces together. `HEAD_INITS` is
the registry of `model.head_init` values (their names also in `catalog.HEAD_INIT_NAMES`, which the
spec's validation reads; `same_names` holds them equal at import); `check_arch` checks model.arch against
torchvision. Imports no Ray.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from orchestrator.config.catalog import ARCH_NAMES, HEAD_INIT_NAMES, same_names
from orchestrator.config.errors import JobError, SpecError, did_you_mean
from orchestrator.config.spec import ModelSpec
from orchestrator.train.timm_models import (TimmBuildError, build_timm, check_timm_arch, is_timm, resample_position_embedding,
                                            timm_head)
from orchestrator.train.weights import (LoadReport, WeightsError, abbreviate, align_keys, is_buffer_counter,
                                        load_matching, read_source_weights)


class ModelError(JobError, ValueError):
    """A model the spec asks for that cannot be built as asked; the message names the key."""


class FreezeError(ModelError):
    """A freeze that selects no module, or every parameter."""


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """SpecError naming model.arch when torchvision has no such classification model. The names of
    catalog.ARCH_NAMES pass without importing torchvision's list (the spec accepted them already); another
    name (a newer torchvision's) is looked up here, `timm/<name>` in timm's list. `validate`, the planner
    and `submit` call this."""
    if arch in ARCH_NAMES:
        return
    if is_timm(arch):
        check_timm_arch(arch)
        return
    names = classification_models()
    if arch not in names:
        raise SpecError([f"model.arch: unknown architecture {arch!r}{did_you_mean(arch, names)}; valid: any of "
                         f"torchvision's {len(names)} classification models (resnet18, resnet50, vit_b_16, ...: "
                         "torchvision.models.list_models(module=torchvision.models))"])


def _arch_kwargs(arch: str, image_size: int) -> dict:
    kwargs: dict = {}
    if arch in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = True  # torchvision's own scheme; silences its FutureWarning
    if arch.startswith("vit_"):
        kwargs["image_size"] = image_size
    return kwargs


STOCHASTIC_DEPTH_FAMILIES = "convnext_*, efficientnet_*, swin_*, maxvit_t"
"""torchvision's models whose constructor takes stochastic_depth_prob (model.drop_path_rate)"""


def build_architecture(arch: str, num_classes: int, image_size: int = 224, dropout: float | None = None,
                       drop_path_rate: float | None = None) -> nn.Module:
    """A torchvision (or `timm/<name>`) classifier with a fresh head for num_classes (no weights loaded).
    `drop_path_rate`: stochastic depth (timm's drop_path_rate, torchvision's stochastic_depth_prob)."""
    if is_timm(arch):
        try:
            return build_timm(arch, num_classes, dropout, image_size, drop_path_rate)
        except TimmBuildError as exc:
            raise ModelError(str(exc)) from None
    known = classification_models()
    if arch not in known:
        import difflib

        close = difflib.get_close_matches(arch, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"model.arch: unknown torchvision classification model {arch!r}{hint}")
    kwargs = _arch_kwargs(arch, image_size)
    if dropout is not None:
        kwargs["dropout"] = dropout
    if drop_path_rate is not None:
        kwargs["stochastic_depth_prob"] = drop_path_rate
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        if dropout is not None and "dropout" in str(exc):
            raise ModelError(f"model.dropout: {arch} takes no dropout argument; leave model.dropout null") from None
        if drop_path_rate is not None and "stochastic_depth_prob" in str(exc):
            raise ModelError(f"model.drop_path_rate: {arch} has no stochastic depth; torchvision's that have: "
                             f"{STOCHASTIC_DEPTH_FAMILIES}; timm's: most (timm/<name>)") from None
        raise


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter and buffer a constructor registers moves to the meta device (memory untouched)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer_on_meta(module, name, tensor, persistent=True):
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def build_on_meta(arch: str, num_classes: int, image_size: int = 224, drop_path_rate: float | None = None) -> nn.Module:
    """The architecture with parameters and buffers on the meta device: shapes only, no memory, no init.

    Constructors that compute with tensors (RegNet's widths call .tolist()) cannot run under the meta
    device; they run on the CPU while each parameter moves to meta as it is registered.
    """
    try:
        with torch.device("meta"):
            return build_architecture(arch, num_classes, image_size, drop_path_rate=drop_path_rate)
    except (NotImplementedError, RuntimeError):
        with _parameters_on_meta():
            return build_architecture(arch, num_classes, image_size, drop_path_rate=drop_path_rate)


@functools.lru_cache(maxsize=64)
def head_module_names(arch: str, image_size: int = 224) -> tuple[str, ...]:
    """Names of the modules whose parameters depend on the class count (the head, aux heads too)."""
    a = build_on_meta(arch, 5, image_size)
    if is_timm(arch):
        return timm_head(a)
    b = build_on_meta(arch, 6, image_size)
    shapes_b = {k: v.shape for k, v in b.state_dict().items()}
    return tuple(sorted({k.rsplit(".", 1)[0] for k, v in a.state_dict().items() if shapes_b.get(k) != v.shape}))


def _kernel_fits(module: nn.Module, inputs: tuple) -> None:
    """Forward pre-hook: the (padded) input must be at least the kernel's extent; meta tensors skip this check."""
    size = lambda value: value if isinstance(value, tuple) else (value, value)  # noqa: E731
    kernel, padding = size(module.kernel_size), size(module.padding)
    dilation = size(getattr(module, "dilation", 1))
    if isinstance(padding[0], str):   # 'same' / 'valid'
        return
    height, width = inputs[0].shape[-2:]
    for have, k, p, d in zip((height, width), kernel, padding, dilation):
        if have + 2 * p < d * (k - 1) + 1:
            raise RuntimeError(f"the input to {type(module).__name__} is {height}x{width} "
                               f"(padded {height + 2 * padding[0]}x{width + 2 * padding[1]}), smaller than its kernel {kernel}")


def check_input_size(arch: str, num_classes: int, image_size: int) -> None:
    """Raise ModelError when the model cannot take image_size x image_size inputs (shape-only, on meta)."""
    try:
        model = build_on_meta(arch, num_classes, image_size).train()
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                module.register_forward_pre_hook(_kernel_fits)
        with torch.device("meta"):
            model(torch.empty(2, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as exc:   # torchvision asserts some shapes (ViT's patches)
        reason = str(exc).strip().splitlines()[0]
        raise ModelError(f"data.image_size: {arch} cannot take {image_size}x{image_size} images ({reason}); "
                         "use another image_size") from None


HEAD_INITS: dict[str, Callable[[nn.Module], None] | None] = {
    "default": None,   # keep the architecture's own init
    "kaiming_normal": lambda m: nn.init.kaiming_normal_(
        m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in", nonlinearity="relu"),
    "kaiming_uniform": lambda m: nn.init.kaiming_uniform_(m.weight, nonlinearity="relu"),
    "xavier_normal": lambda m: nn.init.xavier_normal_(m.weight),
    "xavier_uniform": lambda m: nn.init.xavier_uniform_(m.weight),
}
"""model.head_init -> the init of a new conv/linear weight (names: catalog.HEAD_INIT_NAMES)"""
same_names(HEAD_INITS, HEAD_INIT_NAMES, "train.models.HEAD_INITS")


def init_module(module: nn.Module, scheme: str) -> None:
    """Re-initialise a conv/linear layer's weight with `scheme`, bias to zero; norm layers to (1, 0)."""
    init_weight = HEAD_INITS[scheme]
    if init_weight is None:
        return
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        init_weight(module)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def zero_last_bn_of_blocks(model: nn.Module, not_loaded: set[str]) -> list[str]:
    """Zero the gamma of the last BatchNorm in every torchvision residual block (bn2 of a BasicBlock, bn3 of a
    Bottleneck) whose weight was not loaded from model.weights, so each block starts as the identity
    (Goyal et al. 2017, section 5.1). Returns the zeroed BatchNorm names."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    zeroed = []
    for name, module in model.named_modules():
        last = "bn3" if isinstance(module, Bottleneck) else "bn2" if isinstance(module, BasicBlock) else None
        if last and f"{name}.{last}.weight" in not_loaded:
            nn.init.zeros_(getattr(module, last).weight)
            zeroed.append(f"{name}.{last}")
    return zeroed


def init_new_layers(model: nn.Module, missing: list[str], scheme: str) -> list[str]:
    """Initialise every module none of whose parameters were loaded. Returns their names."""
    missing_set = set(missing)
    renewed = []
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if own and all(p in missing_set for p in own):
            init_module(module, scheme)
            renewed.append(name)
    return renewed


def _selected(names: list[str], pattern: str) -> list[str]:
    """Parameter names a freeze entry selects: a glob when it has * ? or [, else a module-name prefix."""
    if any(ch in pattern for ch in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*")]
    return [n for n in names if n == pattern or n.startswith(pattern.rstrip(".") + ".")]


def freeze_targets(model: nn.Module, freeze: list[str], head: tuple[str, ...], key: str = "model.freeze") -> list[str]:
    """Parameter names that `freeze` selects: module prefixes or globs, or 'backbone' = all but the head."""
    names = [n for n, _ in model.named_parameters()]
    if freeze == ["backbone"]:
        return [n for n in names if not any(n == h or n.startswith(h + ".") for h in head)]
    selected = []
    for pattern in freeze:
        hits = _selected(names, pattern)
        if not hits:
            top = sorted({n.split(".", 1)[0] for n in names})
            raise FreezeError(f"{key}: {pattern!r} matches no module; top-level modules: {', '.join(top)}")
        selected += hits
    return sorted(set(selected), key=names.index)


def unfreeze_steps(model: nn.Module, spec: ModelSpec, frozen: list[str], head: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """[(epoch, parameter names that start training then)], from model.unfreeze or model.unfreeze_at_epoch.

    A step that frees nothing still frozen is a FreezeError naming it.
    """
    if spec.unfreeze_at_epoch is not None:
        return [(spec.unfreeze_at_epoch, list(frozen))]
    steps, still_frozen = [], set(frozen)
    for i, step in enumerate(spec.unfreeze):
        key = f"model.unfreeze.{i}.modules"
        freed = [n for n in freeze_targets(model, step.modules, head, key) if n in still_frozen]
        if not freed:
            raise FreezeError(f"{key}: {step.modules} frees nothing that is still frozen at epoch {step.at_epoch}")
        still_frozen.difference_update(freed)
        steps.append((step.at_epoch, freed))
    return steps


def frozen_norm_layers(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers none of whose parameters train (put in eval mode when model.train_bn is false)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters(recurse=False))]


def set_trainable(model: nn.Module, param_names: list[str], trainable: bool) -> None:
    wanted = set(param_names)
    for name, param in model.named_parameters():
        if name in wanted:
            param.requires_grad_(trainable)


def trainability_rows(model: nn.Module) -> list[tuple[str, int, int]]:
    """(top-level module, parameters, trainable parameters) in model order."""
    rows: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0]
        counts = rows.setdefault(top, [0, 0])
        counts[0] += param.numel()
        counts[1] += param.numel() if param.requires_grad else 0
    return [(top, total, trainable) for top, (total, trainable) in rows.items()]


@dataclass
class BuiltModel:
    model: nn.Module
    head: tuple[str, ...]
    frozen: list[str]
    """parameter names frozen at the start"""
    unfreeze: list[tuple[int, list[str]]]
    """(epoch, parameter names that start training at it)"""
    report: LoadReport | None
    renewed: list[str]
    """modules initialised by head_init"""


def build_model(spec: ModelSpec, num_classes: int, image_size: int, class_names: list[str] | None = None) -> BuiltModel:
    """Architecture + weights that fit + head_init on new layers + freezing, per the spec.

    `class_names`: the data's classes, to refuse keeping a head trained on other classes.
    """
    model = build_architecture(spec.arch, num_classes, image_size, spec.dropout, spec.drop_path_rate)
    head = head_module_names(spec.arch, image_size)
    report = None
    if spec.weights is None:
        missing = [n for n, _ in model.named_parameters()]
    else:
        report = load_weights(model, spec, head, class_names)
        missing = (report.missing + report.new_head + [name for name, _, _ in report.skipped_shape]
                   + [name for name, _, _ in report.skipped_dtype])
    renewed = init_new_layers(model, missing, spec.head_init)
    if spec.zero_init_residual:
        zero_last_bn_of_blocks(model, set(missing))
    frozen = freeze_targets(model, spec.freeze, head) if spec.freeze else []
    set_trainable(model, frozen, False)
    return BuiltModel(model, head, frozen, unfreeze_steps(model, spec, frozen, head), report, renewed)


def load_weights(model: nn.Module, spec: ModelSpec, head: tuple[str, ...], class_names: list[str] | None) -> LoadReport:
    """Load what fits of model.weights; the head is new unless model.keep_head. Refuses weights of which
    too little of the backbone loads (model.min_backbone_loaded), and a kept head for other classes."""
    source = read_source_weights(spec.weights, spec.arch, spec.weights_ema)
    state_dict, key_note = align_keys(source.state_dict, set(model.state_dict()), spec.weights_prefix)
    state_dict, grid_note = resample_position_embedding(model, state_dict) if is_timm(spec.arch) else (state_dict, None)
    if spec.keep_head and source.class_names and class_names and source.class_names != class_names:
        raise ModelError(f"model.keep_head: the head of {source.description} was trained on other classes "
                         f"({abbreviate(source.class_names, 5)}) than this job's ({abbreviate(class_names, 5)}); "
                         "a kept head would start the new classes from the old ones. Drop model.keep_head")
    report = load_matching(model, state_dict, source.description, () if spec.keep_head else head)
    misfit = [(name, got, want) for name, got, want in report.skipped_shape if any(name.startswith(h + ".") for h in head)]
    if spec.keep_head and misfit:
        name, got, want = misfit[0]
        raise ModelError(f"model.keep_head: the head of {source.description} does not fit this job's classes: {name} is "
                         f"{tuple(got)}, the model needs {tuple(want)} ({want[0]} classes in the data, {got[0]} in the "
                         "weights); drop model.keep_head for a new head, or train on the weights' classes")
    report.notes += [note for note in (source.note, key_note, grid_note) if note]
    if not spec.keep_head:
        report.notes.append(f"new head {', '.join(head)}: initialised with {spec.head_init} "
                            "(model.keep_head: true keeps the source's head)")
    _check_backbone_loaded(model, report, head, spec.min_backbone_loaded)
    return report


def _check_backbone_loaded(model: nn.Module, report: LoadReport, head: tuple[str, ...], minimum: float) -> None:
    backbone = {k for k in model.state_dict() if not is_buffer_counter(k) and not any(k.startswith(h + ".") for h in head)}
    loaded = sum(1 for k in report.loaded if k in backbone)
    if backbone and loaded / len(backbone) < minimum:
        hint = f"; the weights' keys look like {abbreviate(report.unexpected, 3)}" if report.unexpected else ""
        raise WeightsError(f"model.weights: only {loaded} of the backbone's {len(backbone)} tensors loaded from "
                           f"{report.source} (model.min_backbone_loaded {minimum:g}){hint}; set model.weights_prefix, "
                           "check model.arch, or set model.min_backbone_loaded: 0 to train on anyway")


def model_output_logits(output) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main logits, aux logits) from a model's forward (inception/googlenet return namedtuples)."""
    if isinstance(output, torch.Tensor):
        return output, []
    main = output[0]
    aux = [t for t in output[1:] if isinstance(t, torch.Tensor)]
    return main, aux
