"""Pretrained weights: reading them (files, torchvision's hub cache, run folders) and loading what fits.

A `model.weights` value becomes a state_dict (`read_source_weights`), always read with
`weights_only=True` or from safetensors. `load_matching` copies a tensor when its name AND shape
fit the model, and its `LoadReport` says what was skipped, missing and unexpected. Imports no Ray.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


class WeightsError(Exception):
    """Weights that cannot be found or read; the message says what and where."""


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
