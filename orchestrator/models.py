"""Model surgery: build any torchvision classifier for N classes, init new layers, freeze.

The head is found without a per-family table: the model is built on the meta device for two class
counts and the parameters whose shapes differ are the head (fc, classifier[-1], heads.head,
squeezenet's conv, inception's AuxLogits.fc, googlenet's aux heads). Reading and matching
pretrained weights is `weights.py`'s job; `build_model` puts the pieces together. `HEAD_INITS` is
the registry of `model.head_init` values. Imports no Ray.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from orchestrator.spec import ModelSpec
from orchestrator.weights import LoadReport, load_matching, read_source_weights

class ModelError(ValueError):
    """A model the spec asks for that cannot be built as asked; the message names the key."""


class FreezeError(ModelError):
    """A freeze that selects no module, or every parameter."""


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _arch_kwargs(arch: str, image_size: int) -> dict:
    kwargs: dict = {}
    if arch in ("inception_v3", "googlenet"):
        kwargs["init_weights"] = True  # torchvision's own scheme; silences its FutureWarning
    if arch.startswith("vit_"):
        kwargs["image_size"] = image_size
    return kwargs


def build_architecture(arch: str, num_classes: int, image_size: int = 224, dropout: float | None = None) -> nn.Module:
    """A torchvision classifier with a fresh head for num_classes (no weights loaded)."""
    known = classification_models()
    if arch not in known:
        import difflib

        close = difflib.get_close_matches(arch, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"model.arch: unknown torchvision classification model {arch!r}{hint}")
    kwargs = _arch_kwargs(arch, image_size)
    if dropout is not None:
        kwargs["dropout"] = dropout
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        if dropout is not None and "dropout" in str(exc):
            raise ModelError(f"model.dropout: {arch} takes no dropout argument; leave model.dropout null") from None
        raise


@functools.lru_cache(maxsize=64)
def head_module_names(arch: str, image_size: int = 224) -> tuple[str, ...]:
    """Names of the modules whose parameters depend on the class count (the head, aux heads too)."""
    with torch.device("meta"):
        a = build_architecture(arch, 5, image_size)
        b = build_architecture(arch, 6, image_size)
    shapes_b = {k: v.shape for k, v in b.state_dict().items()}
    return tuple(sorted({k.rsplit(".", 1)[0] for k, v in a.state_dict().items() if shapes_b.get(k) != v.shape}))


def check_input_size(arch: str, num_classes: int, image_size: int) -> None:
    """Raise ValueError when the model cannot take image_size x image_size inputs (shape-only, on meta)."""
    with torch.device("meta"):
        model = build_architecture(arch, num_classes, image_size).train()
        try:
            model(torch.empty(2, 3, image_size, image_size))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[0]
            raise ModelError(f"data.image_size: {arch} cannot take {image_size}x{image_size} images ({reason}); "
                             "use a larger image_size") from None


HEAD_INITS: dict[str, Callable[[nn.Module], None] | None] = {
    "default": None,   # keep the architecture's own init
    "kaiming_normal": lambda m: nn.init.kaiming_normal_(
        m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in", nonlinearity="relu"),
    "kaiming_uniform": lambda m: nn.init.kaiming_uniform_(m.weight, nonlinearity="relu"),
    "xavier_normal": lambda m: nn.init.xavier_normal_(m.weight),
    "xavier_uniform": lambda m: nn.init.xavier_uniform_(m.weight),
}
"""model.head_init -> the init of a new conv/linear weight; the spec's validation reads this"""


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


def freeze_targets(model: nn.Module, freeze: list[str], head: tuple[str, ...]) -> list[str]:
    """Parameter names that `freeze` selects: module prefixes, or 'backbone' = all but the head."""
    names = [n for n, _ in model.named_parameters()]
    if freeze == ["backbone"]:
        return [n for n in names if not any(n == h or n.startswith(h + ".") for h in head)]
    selected = []
    for prefix in freeze:
        hits = [n for n in names if n == prefix or n.startswith(prefix.rstrip(".") + ".")]
        if not hits:
            top = sorted({n.split(".", 1)[0] for n in names})
            raise FreezeError(f"model.freeze: {prefix!r} matches no module; top-level modules: {', '.join(top)}")
        selected += hits
    return sorted(set(selected), key=names.index)


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
    report: LoadReport | None
    renewed: list[str]
    """modules initialised by head_init"""


def build_model(spec: ModelSpec, num_classes: int, image_size: int) -> BuiltModel:
    """Architecture + weights that fit + head_init on new layers + freezing, per the spec."""
    model = build_architecture(spec.arch, num_classes, image_size, spec.dropout)
    report = None
    if spec.weights is None:
        missing = [n for n, _ in model.named_parameters()]
    else:
        state_dict, source = read_source_weights(spec.weights, spec.arch)
        report = load_matching(model, state_dict, source)
        missing = report.missing + [name for name, _, _ in report.skipped_shape]
    renewed = init_new_layers(model, missing, spec.head_init)
    head = head_module_names(spec.arch, image_size)
    frozen = freeze_targets(model, spec.freeze, head) if spec.freeze else []
    set_trainable(model, frozen, False)
    return BuiltModel(model, head, frozen, report, renewed)


def model_output_logits(output) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main logits, aux logits) from a model's forward (inception/googlenet return namedtuples)."""
    if isinstance(output, torch.Tensor):
        return output, []
    main = output[0]
    aux = [t for t in output[1:] if isinstance(t, torch.Tensor)]
    return main, aux
