"""Pretrained weights: reading them (files, torchvision's hub cache, run folders) and loading what fits.

A `model.weights` value becomes a state_dict (`read_source_weights`); files are read by content
(`train/weight_files.py`: safetensors, or torch files with `weights_only=True`). `load_matching` copies a tensor when its name AND shape
fit the model, and its `LoadReport` says what was skipped, missing and unexpected. Imports no Ray.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from orchestrator.config.catalog import TIMM_PREFIX
from orchestrator.config.errors import SpecError
from orchestrator.config.spec import JobSpec
from orchestrator.store.storage import WEIGHTS_FILE, RunFolder, read_uri_bytes
from orchestrator.train.weight_files import WEIGHT_FILE_SUFFIXES, EmaChoice, WeightsError, read_weights


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    skipped_shape: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    """(name, shape in the weights, shape in the model)"""
    skipped_dtype: list[tuple[str, str, str]] = field(default_factory=list)
    """(name, dtype in the weights, dtype in the model): integer or bool tensors never load into float ones"""
    missing: list[str] = field(default_factory=list)
    """in the model, not in the weights: keep their fresh init"""
    unexpected: list[str] = field(default_factory=list)
    """in the weights, not in the model: ignored"""
    new_head: list[str] = field(default_factory=list)
    """head tensors of the weights left out on purpose: the head is new (model.keep_head false)"""
    notes: list[str] = field(default_factory=list)
    """what was done to the keys (a prefix stripped) and to the head"""

    def lines(self) -> list[str]:
        dtype = f", skipped {len(self.skipped_dtype)} for dtype" if self.skipped_dtype else ""
        out = [f"weights {self.source}: loaded {len(self.loaded)} tensors, skipped {len(self.skipped_shape)} for shape{dtype}, "
               f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"]
        out += [f"  {note}" for note in self.notes]
        out += [f"  skipped {name}: weights {list(src)} vs model {list(dst)}" for name, src, dst in self.skipped_shape]
        out += [f"  skipped {name}: weights hold {src}, the model {dst}" for name, src, dst in self.skipped_dtype]
        if self.missing:
            out.append(f"  missing (fresh init): {abbreviate(self.missing)}")
        if self.unexpected:
            out.append(f"  unexpected (ignored): {abbreviate(self.unexpected)}")
        return out


def abbreviate(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


COMMON_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "net.")
"""prefixes other tools put before the torchvision names (DDP, torch.compile, Lightning, timm-style wrappers)"""


@dataclass
class SourceWeights:
    state_dict: dict[str, torch.Tensor]
    description: str
    class_names: list[str] | None = None
    """the source's classes, when known (a run folder of this tool)"""
    note: str | None = None
    """which part of the file was taken (its EMA weights, the state dict under 'model', ...)"""


def align_keys(state_dict: dict, model_keys: set[str], prefix: str | None) -> tuple[dict, str | None]:
    """The state_dict with its keys put in the model's terms, and a note saying what was done.

    `prefix` (model.weights_prefix): keep only the keys under it, prefix removed. Else the one or two
    of COMMON_PREFIXES (nested wrappers) whose stripping makes the most keys match are stripped.
    """
    if prefix:
        kept = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not kept:
            raise WeightsError(f"model.weights_prefix: no key of the weights starts with {prefix!r} "
                               f"(first keys: {abbreviate(list(state_dict), 3)})")
        return kept, f"took the {len(kept)} tensors under {prefix!r} (model.weights_prefix), prefix removed"
    def matches(prefixes: tuple[str, ...]) -> int:
        return sum(_without_all(k, prefixes) in model_keys for k in state_dict)

    candidates = [()] + [(p,) for p in COMMON_PREFIXES] + [(p, q) for p in COMMON_PREFIXES for q in COMMON_PREFIXES]
    best = max(candidates, key=lambda prefixes: (matches(prefixes), -len(prefixes)))
    if not best:
        return state_dict, None
    return {_without_all(k, best): v for k, v in state_dict.items()}, f"stripped the key prefix {''.join(best)!r}"


def _without_all(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        key = _without(key, prefix)
    return key


def _without(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def torchvision_weights(arch: str, name: str):
    """The torchvision Weights enum member for `name` ('DEFAULT', 'IMAGENET1K_V1' or 'ResNet18_Weights.X')."""
    try:
        enum = torchvision.models.get_model_weights(arch)
        weights = torchvision.models.get_weight(name) if "." in name else enum[name]
    except (KeyError, ValueError, AttributeError):
        try:
            valid = ["DEFAULT"] + [w.name for w in torchvision.models.get_model_weights(arch)]
        except Exception:
            valid = []
        raise WeightsError(f"model.weights: {name!r} is not a file, a run folder, or a torchvision weight of {arch}"
                           + (f"; valid names: {', '.join(valid)}" if valid else "")) from None
    if type(weights) is not enum:
        raise WeightsError(f"model.weights: {name} are weights of another architecture than model.arch {arch}; "
                           f"{arch}'s are {enum.__name__}: DEFAULT, {', '.join(w.name for w in enum)}")
    return weights


def read_weights_file(path: Path, ema: EmaChoice = "auto") -> SourceWeights:
    """A local weights file of any tool, read by its content (see weight_files.read_weights)."""
    found = read_weights(path, str(path), ema)
    return SourceWeights(found.state_dict, str(path), note=found.note)


def read_torchvision_weights(arch: str, name: str, ema: EmaChoice = "auto") -> SourceWeights:
    """State dict of a torchvision weight through the torch hub cache, or a message saying where to put it."""
    weights = torchvision_weights(arch, name)
    file_name = weights.url.rsplit("/", 1)[-1]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    cached = folder / file_name
    label = f"{type(weights).__name__}.{weights.name}"
    classes = list(weights.meta.get("categories") or []) or None
    if cached.is_file():
        return SourceWeights(read_weights(cached, str(cached), ema).state_dict, f"{label} ({cached})", classes)
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, progress=False, weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"model.weights: cannot download {label} ({type(exc).__name__}); put {file_name} (from {weights.url}) "
            f"in {folder}/ (set TORCH_HOME to move that folder)"
        ) from None
    return SourceWeights(state, f"{label} ({cached})", classes)


def read_timm_weights(arch: str, tag: str, ema: EmaChoice = "auto") -> SourceWeights:
    """timm's pretrained weights `tag` of a `timm/<name>` arch, from the cache timm reads (nothing downloads)."""
    from orchestrator.train.timm_models import timm_weights_file

    path, label = timm_weights_file(arch, tag)
    found = read_weights(path, str(path), ema)
    return SourceWeights(found.state_dict, f"{label} ({path})", note=found.note)


def read_run_folder_weights(folder: RunFolder, ema: EmaChoice = "auto") -> SourceWeights:
    """A run folder's best checkpoint (else its latest), with its classes from model.safetensors when written."""
    found = folder.best_or_latest_checkpoint()
    if found is None:
        raise WeightsError(f"model.weights: run folder {folder.uri} holds no checkpoint (checkpoint_*/checkpoint.pt)")
    read = read_weights(folder.read_bytes(found), f"{folder.uri}/{found}", ema)
    classes = None
    if folder.exists(WEIGHTS_FILE):
        written = safetensors_metadata(folder.read_bytes(WEIGHTS_FILE)).get("classes")
        classes = written.split(",") if written else None
    return SourceWeights(read.state_dict, f"run {folder.uri} ({found})", classes, read.note)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (an 8-byte length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


def weights_kind(weights: str) -> str:
    """What a `model.weights` value names: 'remote file', 'remote run', 'run', 'file', 'missing' (a path
    that is not there) or 'torchvision' (a weight name). Local files are files whatever their name."""
    if "://" in weights:
        return "remote file" if Path(weights).suffix in WEIGHT_FILE_SUFFIXES else "remote run"
    path = Path(weights).expanduser()
    if path.is_dir():
        return "run"
    if path.is_file():
        return "file"
    if path.suffix in WEIGHT_FILE_SUFFIXES or "/" in weights or weights.startswith((".", "~")):
        return "missing"
    return "torchvision"


def weights_problem(weights: str, arch: str, ema: EmaChoice = "auto") -> str | None:
    """Why `model.weights` cannot be read, or None. A local file is read as training reads it (its tensors
    mapped, not copied), so validate and train accept the same files. URIs are read when the run starts."""
    kind = weights_kind(weights)
    path = Path(weights).expanduser()
    try:
        if kind == "run" and RunFolder(str(path.parent), path.name).best_or_latest_checkpoint() is None:
            return f"model.weights: run folder {path} holds no checkpoint (checkpoint_*/checkpoint.pt)"
        if kind == "file":
            read_weights(path, str(path), ema)
        if kind == "missing":
            return f"model.weights: no such file or run folder {path}"
        if kind == "torchvision" and arch.startswith(TIMM_PREFIX):
            from orchestrator.train.timm_models import timm_weights_file

            timm_weights_file(arch, weights)
        elif kind == "torchvision":
            torchvision_weights(arch, weights)
    except WeightsError as exc:
        return str(exc)
    return None


def check_references(spec: JobSpec) -> JobSpec:
    """The spec, or SpecError when what it names on this machine is not there or not readable (`model.weights`).

    Not part of `validate_spec`: `submit` sends jobs whose paths exist on the cluster, not here.
    """
    if spec.model.weights is not None:
        problem = weights_problem(spec.model.weights, spec.model.arch, spec.model.weights_ema)
        if problem:
            raise SpecError([problem])
    return spec


def read_source_weights(weights: str, arch: str, ema: EmaChoice = "auto") -> SourceWeights:
    """The state_dict (and what is known of it) for a `model.weights` value other than null."""
    kind = weights_kind(weights)
    path = Path(weights).expanduser()
    if kind == "remote file":
        found = read_weights(read_uri_bytes(weights), weights, ema)
        return SourceWeights(found.state_dict, weights, note=found.note)
    if kind in ("remote run", "run"):
        storage, _, name = (weights.rstrip("/") if kind == "remote run" else str(path)).rpartition("/")
        return read_run_folder_weights(RunFolder(storage, name), ema)
    if kind == "file":
        return read_weights_file(path, ema)
    if kind == "missing":
        raise WeightsError(f"model.weights: no such file or run folder {path}")
    if re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", weights):
        if arch.startswith(TIMM_PREFIX):
            return read_timm_weights(arch, weights, ema)
        return read_torchvision_weights(arch, weights, ema)
    raise WeightsError(f"model.weights: {weights!r} is neither a file, a run folder, nor a torchvision weight name")


def load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                  new_head: tuple[str, ...] = ()) -> LoadReport:
    """Copy every tensor whose name and shape fit into model; report the rest.

    `new_head`: module names whose tensors are not loaded whatever their shape (the head is new).
    """
    report = LoadReport(source)
    target = model.state_dict()
    keep = {}
    for name, tensor in state_dict.items():
        if any(name.startswith(module + ".") for module in new_head):
            report.new_head.append(name)
        elif name not in target:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(target[name].shape):
            report.skipped_shape.append((name, tuple(tensor.shape), tuple(target[name].shape)))
        elif tensor.is_floating_point() != target[name].is_floating_point():
            report.skipped_dtype.append((name, _dtype_name(tensor), _dtype_name(target[name])))
        else:
            keep[name] = tensor
            report.loaded.append(name)
    _refuse_non_finite(keep, source)
    report.missing = [name for name in target if name not in state_dict and not is_buffer_counter(name)]
    kept = OrderedDict(keep)
    # module versions (mnasnet checks its own): the source's when it carries them, else the model's
    kept._metadata = getattr(state_dict, "_metadata", None) or getattr(target, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(kept, strict=False)
    return report


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _refuse_non_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """WeightsError when any floating tensor about to load holds NaN or an infinity (a diverged source run)."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise WeightsError(f"model.weights: {source} holds NaN or infinite values in {len(bad)} tensors "
                           f"({abbreviate(bad, 3)}); nothing was loaded (was the source run diverging?)")


def is_buffer_counter(name: str) -> bool:
    return name.endswith("num_batches_tracked")
