"""Model surgery: build any torchvision classifier for N classes, load what fits, freeze, init.

The head is found without a per-family table: the model is built on the meta device for two class
counts and the parameters whose shapes differ are the head (fc, classifier[-1], heads.head,
squeezenet's conv, inception's AuxLogits.fc, googlenet's aux heads). Pretrained weights are loaded
tensor by tensor: a tensor loads when its name AND shape fit, and `LoadReport` says what was
skipped, missing and unexpected. Imports no Ray.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
import torchvision

from orchestrator.spec import ModelSpec

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


class WeightsError(Exception):
    """Weights that cannot be found or read; the message says what and where."""


class ModelError(ValueError):
    """A model the spec asks for that cannot be built as asked; the message names the key."""


class FreezeError(ModelError):
    """A freeze that selects no module, or every parameter."""


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    skipped_shape: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    """(name, shape in the weights, shape in the model)"""
    missing: list[str] = field(default_factory=list)
    """in the model, not in the weights: keep their fresh init"""
    unexpected: list[str] = field(default_factory=list)
    """in the weights, not in the model: ignored"""

    def lines(self) -> list[str]:
        out = [f"weights {self.source}: loaded {len(self.loaded)} tensors, skipped {len(self.skipped_shape)} for shape, "
               f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"]
        out += [f"  skipped {name}: weights {list(src)} vs model {list(dst)}" for name, src, dst in self.skipped_shape]
        if self.missing:
            out.append(f"  missing (fresh init): {_abbreviate(self.missing)}")
        if self.unexpected:
            out.append(f"  unexpected (ignored): {_abbreviate(self.unexpected)}")
        return out


def _abbreviate(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


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


def _strip_prefix(state_dict: dict) -> dict:
    """Drop DDP's 'module.' and torch.compile's '_orig_mod.' prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors, a plain .pth/.pt state_dict, or one of our checkpoints."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"model.weights: cannot read safetensors file {path}: {exc}") from None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"model.weights: cannot load {path} with weights_only=True: {first}") from None
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        payload = payload["model"]  # one of our checkpoints
    elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise WeightsError(f"model.weights: {path} holds no state_dict (a mapping of names to tensors)")
    return _strip_prefix(payload)


def torchvision_weights(arch: str, name: str):
    """The torchvision Weights enum member for `name` ('DEFAULT', 'IMAGENET1K_V1' or 'ResNet18_Weights.X')."""
    try:
        if "." in name:
            return torchvision.models.get_weight(name)
        enum = torchvision.models.get_model_weights(arch)
        return enum[name]
    except (KeyError, ValueError, AttributeError):
        try:
            valid = ["DEFAULT"] + [w.name for w in torchvision.models.get_model_weights(arch)]
        except Exception:
            valid = []
        raise WeightsError(f"model.weights: {name!r} is not a file, a run folder, or a torchvision weight of {arch}"
                           + (f"; valid names: {', '.join(valid)}" if valid else "")) from None


def read_torchvision_weights(arch: str, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """State dict of a torchvision weight through the torch hub cache, or a message saying where to put it."""
    weights = torchvision_weights(arch, name)
    file_name = weights.url.rsplit("/", 1)[-1]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    cached = folder / file_name
    label = f"{type(weights).__name__}.{weights.name}"
    if cached.is_file():
        return read_weights_file(cached), f"{label} ({cached})"
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, progress=False, weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"model.weights: cannot download {label} ({type(exc).__name__}); put {file_name} (from {weights.url}) "
            f"in {folder}/ (set TORCH_HOME to move that folder)"
        ) from None
    return _strip_prefix(state), f"{label} ({cached})"


def read_source_weights(weights: str, arch: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, description) for a `model.weights` value other than null."""
    path = Path(weights).expanduser()
    if path.is_dir():
        from orchestrator.storage import best_checkpoint_file

        found = best_checkpoint_file(path)
        if found is None:
            raise WeightsError(f"model.weights: run folder {path} holds no checkpoint (checkpoint_*/checkpoint.pt)")
        return read_weights_file(found), f"run {path} ({found.relative_to(path)})"
    if path.suffix in WEIGHT_FILE_SUFFIXES:
        if not path.is_file():
            raise WeightsError(f"model.weights: no such file {path}")
        return read_weights_file(path), str(path)
    if re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", weights):
        return read_torchvision_weights(arch, weights)
    raise WeightsError(f"model.weights: {weights!r} is neither a weights file ({', '.join(WEIGHT_FILE_SUFFIXES)}), "
                       "a run folder, nor a torchvision weight name")


def load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Copy every tensor whose name and shape fit into model; report the rest."""
    report = LoadReport(source)
    target = model.state_dict()
    keep = {}
    for name, tensor in state_dict.items():
        if name not in target:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(target[name].shape):
            report.skipped_shape.append((name, tuple(tensor.shape), tuple(target[name].shape)))
        else:
            keep[name] = tensor
            report.loaded.append(name)
    report.missing = [name for name in target if name not in state_dict and not _is_buffer_counter(name)]
    kept = OrderedDict(keep)
    # module versions (mnasnet checks its own): the source's when it carries them, else the model's
    kept._metadata = getattr(state_dict, "_metadata", None) or getattr(target, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(kept, strict=False)
    return report


def _is_buffer_counter(name: str) -> bool:
    return name.endswith("num_batches_tracked")


def init_module(module: nn.Module, scheme: str) -> None:
    """Re-initialise a conv/linear layer's weight with `scheme`, bias to zero; BN to (1, 0)."""
    if scheme == "default":
        return
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        if scheme == "kaiming_normal":
            nn.init.kaiming_normal_(module.weight, mode="fan_out" if isinstance(module, nn.Conv2d) else "fan_in", nonlinearity="relu")
        elif scheme == "kaiming_uniform":
            nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
        elif scheme == "xavier_normal":
            nn.init.xavier_normal_(module.weight)
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(module.weight)
        else:
            raise ValueError(f"model.head_init: unknown {scheme!r}; valid: default, kaiming_normal, kaiming_uniform, xavier_normal, xavier_uniform")
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


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each conv+BN pair folded into one conv (same outputs, faster inference)."""
    from torch.fx.experimental.optimization import fuse

    return fuse(model.eval(), inplace=False)
