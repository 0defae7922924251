"""`orchestrator export`: a run's weights out as ONNX, a torch.export program (.pt2) or safetensors.

With `fold_bn`, every BatchNorm that directly follows a convolution is folded into it
(`torch.fx.experimental.optimization.fuse`, eval mode: w' = w * gamma / sqrt(var + eps),
b' = (b - mean) * gamma / sqrt(var + eps) + beta). The folded model is checked against the unfolded
one on the run's own images before anything is written (`check_folded`), and both are timed on the
CPU at batch 1 and 32 (`inference_ms`). ONNX output is run by onnxruntime, when installed, and
checked against torch the same way. The file is written whole at the end or not at all.
Imports no Ray.
"""

from __future__ import annotations

import io
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from orchestrator.after.fold import fold_batchnorm
from orchestrator.after.trained import EXPORT_FORMAT, Trained, TrainedError
from orchestrator.config.catalog import EXPORT_FORMATS, same_names

MAX_FOLD_ABS_DIFF = 1e-3
"""largest logit difference (relative to the logits' own scale, at least 1) a fold may make"""
CHECK_IMAGES = 64
"""images of the run's data the folded (and ONNX) model is checked on"""
ONNX_OPSET = 18


class ExportError(TrainedError):
    """A model that cannot be exported as asked (exit 2); nothing was written."""


def max_abs_diff(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference - other).abs().max())


def check_close(reference: torch.Tensor, other: torch.Tensor, what: str) -> float:
    """The largest absolute logit difference; ExportError when it exceeds MAX_FOLD_ABS_DIFF x the logits' scale."""
    diff = max_abs_diff(reference, other)
    scale = max(1.0, float(reference.abs().max()))
    if not diff <= MAX_FOLD_ABS_DIFF * scale:
        raise ExportError(f"{what} differs from the trained model by {diff:.3g} in the logits (allowed "
                          f"{MAX_FOLD_ABS_DIFF * scale:.3g}); nothing written")
    return diff


def check_images(trained: Trained, count: int = CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    """(up to `count` of the run's own test images, else val images, through the eval transform; which split)."""
    from orchestrator.data.decode import ImageReadError
    from orchestrator.data.loaders import make_dataset
    from orchestrator.data.sources import load_splits
    from orchestrator.data.splits import DataError

    spec = trained.spec
    try:
        splits = load_splits(spec.data, spec.seed)
    except (DataError, ImageReadError) as exc:
        raise ExportError(f"cannot read the run's data to check the exported model: {exc}") from None
    name, split = ("test", splits.test) if splits.test is not None and len(splits.test) else ("val", splits.val)
    dataset = make_dataset(split, spec.data, False, name)
    if split.kind == "shards":   # streamed: the first batch of the split
        from orchestrator.data.loaders import eval_loader

        return next(iter(eval_loader(dataset, spec.data, count, 0, 1)))[0][:count], name
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    return images, name


def inference_ms(model: nn.Module, image_size: int, batch: int, budget_s: float = 1.0) -> float:
    """Median milliseconds of one forward pass at `batch` on the CPU (random input; at most ~budget_s spent)."""
    x = torch.randn(batch, 3, image_size, image_size)
    times = []
    with torch.no_grad():
        model(x)   # first call: allocation, oneDNN primitive creation
        deadline = time.perf_counter() + budget_s
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
            started = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


@dataclass
class SpeedRow:
    batch: int
    unfolded_ms: float
    folded_ms: float

    @property
    def speedup(self) -> float:
        return self.unfolded_ms / self.folded_ms


def compare_speed(model: nn.Module, folded: nn.Module, image_size: int, batches=(1, 32)) -> list[SpeedRow]:
    """Unfolded then folded timed at each batch size, in this process, on the CPU."""
    return [SpeedRow(b, inference_ms(model, image_size, b), inference_ms(folded, image_size, b)) for b in batches]


def metadata(trained: Trained, folded: bool) -> dict[str, str]:
    """What a reader needs besides the tensors: architecture, classes, eval transform, whether folded."""
    return {"format": EXPORT_FORMAT, "arch": trained.spec.model.arch, "classes": json.dumps(trained.class_names),
            "folded": "true" if folded else "false", "source": trained.where, **trained.preprocess.to_metadata()}


def to_safetensors(model: nn.Module, meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, metadata=meta)


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=4096)


def to_pt2(model: nn.Module, example: torch.Tensor, meta: dict[str, str]) -> bytes:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"orchestrator.json": json.dumps(meta)})
    return buffer.getvalue()


def to_onnx(model: nn.Module, example: torch.Tensor, meta: dict[str, str]) -> bytes:
    """ONNX (torch's dynamo exporter, opset ONNX_OPSET, dynamic batch) with `meta` as metadata_props."""
    try:
        import onnx
    except ImportError:
        raise ExportError("--format onnx needs onnx and onnxscript: pip install 'orchestrator[export]'") from None
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: _batch_dim()},), opset_version=ONNX_OPSET, verbose=False)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        program.save(str(path))
        proto = onnx.load(str(path))
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def onnx_logits(data: bytes, images: torch.Tensor) -> torch.Tensor | None:
    """onnxruntime's logits for `images`, or None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])


WRITERS = {
    "onnx": to_onnx,
    "pt2": to_pt2,
    "safetensors": lambda model, example, meta: to_safetensors(model, meta),
}
"""export --format -> writer(model, example batch, metadata) of the file's bytes; names: catalog.EXPORT_FORMATS"""
same_names(WRITERS, EXPORT_FORMATS, "after.export.WRITERS")


def default_name(trained: Trained, fmt: str, folded: bool) -> str:
    return f"{trained.spec.name}{'_folded' if folded else ''}.{fmt}"


@dataclass
class Exported:
    data: bytes
    """the file's bytes"""
    check_split: str
    """the split the checks ran on"""
    check_count: int
    """images the checks ran on"""
    folded_pairs: int = 0
    fold_diff: float | None = None
    """max abs logit difference folded vs unfolded"""
    onnx_diff: float | None = None
    """max abs logit difference onnxruntime vs torch; None when onnxruntime is not installed"""
    speed: list[SpeedRow] | None = None


def export_run(trained: Trained, fmt: str, fold_bn: bool) -> Exported:
    """The exported bytes of a run's model, every check passed (ExportError otherwise)."""
    if fmt not in WRITERS:
        raise ExportError(f"--format: unknown format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")
    try:
        images, split = check_images(trained)
    except ExportError:
        if fold_bn:                       # a fold is only trusted once checked on the run's own images
            raise
        size = trained.preprocess.image_size
        images, split = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0)), "random (data not readable here)"
    model = trained.model
    with torch.no_grad():
        reference = model(images)
    result = Exported(b"", split, len(images))
    if fold_bn:
        model, result.folded_pairs = fold_batchnorm(model)
        with torch.no_grad():
            result.fold_diff = check_close(reference, model(images), "the folded model")
        result.speed = compare_speed(trained.model, model, trained.preprocess.image_size)
    result.data = WRITERS[fmt](model, images[:2], metadata(trained, fold_bn))
    if fmt == "onnx":
        onnx_out = onnx_logits(result.data, images)
        if onnx_out is not None:
            result.onnx_diff = check_close(reference, onnx_out, "the ONNX model (onnxruntime)")
    return result
