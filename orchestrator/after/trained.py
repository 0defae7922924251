"""A trained model read back, for the commands that come after training: evaluate, predict, export, report.

`open_run_folder(text)` turns a path or URI into the `RunFolder` of a run (exit 2 when it is none).
`load_trained(text)` reads a run folder's weights (its `model.safetensors`, else its best, else its
latest checkpoint, read with weights_only) or a file `orchestrator export` wrote (`.safetensors`
with its metadata, `.onnx` through onnxruntime), and returns a `Trained`: logits for a batch of
normalised images, the class names and the eval transform the model was trained with. Nothing read
here is unpickled. Imports no Ray.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from orchestrator.config.errors import UserError
from orchestrator.store.storage import BEST_CHECKPOINT, SPEC_FILE, WEIGHTS_FILE, RunFolder
from orchestrator.train import checkpoint as ckpt

EXPORT_FORMAT = "orchestrator-export/1"
"""the `format` metadata key of a file `orchestrator export` wrote"""


class TrainedError(UserError):
    """A run folder or model file that cannot be used as asked; the message names it (exit 2)."""


@dataclass
class Preprocess:
    """What turns a decoded image into the model's input: the run's eval transform."""

    image_size: int
    """side of the square input, pixels"""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None
    """short side resized to this before the center crop (data.eval_resize); None: to image_size"""
    exif_transpose: bool = True
    """images are turned upright by their EXIF orientation before anything else (data.exif_transpose)"""

    def to_metadata(self) -> dict[str, str]:
        return {"image_size": str(self.image_size), "mean": json.dumps(list(self.mean)), "std": json.dumps(list(self.std)),
                "eval_resize": json.dumps(self.resize), "exif_transpose": json.dumps(self.exif_transpose)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "Preprocess":
        return cls(int(meta["image_size"]), tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])),
                   json.loads(meta.get("eval_resize", "null")), json.loads(meta.get("exif_transpose", "true")))

    def transform(self):
        from orchestrator.data.transforms import eval_transform

        return eval_transform(self.image_size, self.mean, self.std, self.resize)


@dataclass
class Trained:
    where: str
    """what the weights were read from (for messages)"""
    class_names: list[str]
    preprocess: Preprocess
    logits: Callable[[torch.Tensor], torch.Tensor]
    """normalised float (N, 3, S, S) -> float32 (N, classes) logits, no gradient"""
    model: nn.Module | None = None
    """the torch module (eval mode, CPU), when there is one"""
    spec: object | None = None
    """the run's JobSpec (run folders only)"""
    folder: RunFolder | None = None


def open_run_folder(text: str) -> RunFolder:
    """The run (or sweep) folder at a path or URI; TrainedError when there is nothing there."""
    if "://" in text:
        storage, _, name = text.rstrip("/").rpartition("/")
    else:
        path = Path(text).expanduser().resolve()
        storage, name = str(path.parent), path.name
    folder = RunFolder(storage, name)
    try:
        present = folder.exists("")
    except OSError as exc:
        raise TrainedError(f"cannot read {text}: {exc}") from None
    if not present:
        raise TrainedError(f"no such run folder: {text}")
    return folder


def read_run_spec(folder: RunFolder):
    """The JobSpec a run was trained with (its spec.yaml); TrainedError when the folder is not a run."""
    from orchestrator.config.errors import SpecError
    from orchestrator.config.jobfile import validate_spec

    if not folder.exists(SPEC_FILE):
        raise TrainedError(f"{folder.uri} is not a run folder (no {SPEC_FILE}; a run writes it when it starts)")
    try:
        return validate_spec(yaml.safe_load(folder.read_bytes(SPEC_FILE)) or {})
    except SpecError as exc:
        raise TrainedError(f"{folder.uri}/{SPEC_FILE} is not a valid job: {exc.problems[0]}") from None


def weights_source(folder: RunFolder) -> str:
    """The file a run's weights are read from: model.safetensors, else the best, else the latest checkpoint."""
    for candidate in (WEIGHTS_FILE, BEST_CHECKPOINT, folder.latest_checkpoint()):
        if candidate and folder.exists(candidate):
            return candidate
    raise TrainedError(f"run {folder.uri} has no weights yet (no {WEIGHTS_FILE} and no checkpoint): "
                       "it has not finished an epoch")


def _run_state_dict(folder: RunFolder, source: str) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """(state dict, class names if the file records them) of a run's weights file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from orchestrator.train.weights import safetensors_metadata

    data = folder.read_bytes(source)
    if source != WEIGHTS_FILE:
        return ckpt.evaluated_weights(ckpt.decode(data, f"{folder.uri}/{source}")), None
    try:
        state = load(data)
    except (SafetensorError, ValueError) as exc:
        raise TrainedError(f"cannot read {folder.uri}/{source}: {exc}") from None
    classes = safetensors_metadata(data).get("classes")
    return state, classes.split(",") if classes else None


def _run_class_names(spec, recorded: list[str] | None) -> list[str]:
    if recorded:
        return recorded
    from orchestrator.data.sources import load_splits
    from orchestrator.data.splits import DataError

    try:
        return load_splits(spec.data, spec.seed).class_names
    except DataError as exc:
        raise TrainedError(f"the run's weights do not record its classes and its data cannot be read: {exc}") from None


def load_run(folder: RunFolder) -> Trained:
    """The run's trained model (eval mode, CPU) with its classes and eval transform."""
    from orchestrator.train.models import build_architecture

    spec = read_run_spec(folder)
    source = weights_source(folder)
    state, recorded = _run_state_dict(folder, source)
    class_names = _run_class_names(spec, recorded)
    model = build_architecture(spec.model.arch, len(class_names), spec.data.image_size, spec.model.dropout)
    ckpt.load_model_state(model, state, f"{folder.uri}/{source}")
    model.eval()
    preprocess = Preprocess(spec.data.image_size, tuple(spec.data.mean), tuple(spec.data.std), spec.data.eval_resize,
                            spec.data.exif_transpose)
    return Trained(f"{folder.uri}/{source}", class_names, preprocess, torch_logits(model, spec.scaling.amp),
                   model, spec, folder)


def torch_logits(model: nn.Module, amp: str = "none") -> Callable[[torch.Tensor], torch.Tensor]:
    from orchestrator.train.loop import autocast
    from orchestrator.train.models import model_output_logits

    device = next(model.parameters()).device

    @torch.no_grad()
    def logits(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return model_output_logits(model(images.to(device)))[0].float().cpu()

    return logits


def _export_metadata(meta: dict[str, str], where: str) -> tuple[list[str], Preprocess]:
    if meta.get("format") != EXPORT_FORMAT:
        raise TrainedError(f"{where} was not written by `orchestrator export` (no {EXPORT_FORMAT} metadata); "
                           "give a run folder or an exported file")
    return json.loads(meta["classes"]), Preprocess.from_metadata(meta)


def load_exported_safetensors(path: Path) -> Trained:
    """An exported .safetensors: the architecture named in its metadata (folded when it says so), strictly loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from orchestrator.train.models import build_architecture
    from orchestrator.train.weights import safetensors_metadata

    data = path.read_bytes()
    try:
        state, meta = load(data), safetensors_metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise TrainedError(f"cannot read {path}: {exc}") from None
    class_names, preprocess = _export_metadata(meta, str(path))
    model = build_architecture(meta["arch"], len(class_names), preprocess.image_size).eval()
    if meta.get("folded") == "true":
        from orchestrator.after.fold import fold_batchnorm

        model, _ = fold_batchnorm(model)
    ckpt.load_model_state(model, state, str(path))
    return Trained(str(path), class_names, preprocess, torch_logits(model), model)


def load_exported_onnx(path: Path) -> Trained:
    """An exported .onnx, run by onnxruntime (the `export` extra)."""
    try:
        import onnxruntime
    except ImportError:
        raise TrainedError(f"{path}: reading ONNX needs onnxruntime: pip install 'orchestrator[export]'") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:   # onnxruntime raises its own untyped errors for files it cannot parse
        raise TrainedError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    class_names, preprocess = _export_metadata(session.get_modelmeta().custom_metadata_map, str(path))
    input_name = session.get_inputs()[0].name

    def logits(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(session.run(None, {input_name: images.numpy()})[0], dtype=np.float32))

    return Trained(str(path), class_names, preprocess, logits)


EXPORTED_READERS = {".safetensors": load_exported_safetensors, ".onnx": load_exported_onnx}


def load_trained(text: str) -> Trained:
    """A run folder (path or URI) or an exported model file."""
    path = Path(text).expanduser()
    if path.suffix in EXPORTED_READERS and "://" not in text:
        if not path.is_file():
            raise TrainedError(f"no such file: {text}")
        return EXPORTED_READERS[path.suffix](path)
    if path.is_file():
        raise TrainedError(f"{text}: not a run folder nor an exported model ({', '.join(EXPORTED_READERS)})")
    return load_run(open_run_folder(text))
