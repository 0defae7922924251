"""`orchestrator doctor JOB`: why a job trains at the speed it does.

A short pass of the job in this process (one worker, the job's global batch through accumulation, its
data, model, loader settings): each stage of a batch timed on its own (read the files, decode, augment,
copy to the device, the step), then `DOCTOR_STEPS` real optimizer steps at LR 0 (nothing learns,
nothing is saved) with the loader as a run would use it, timing how long the loop waited for data.
The slowest stage and the knobs that move it are the advice. Imports no Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestrator.config.spec import JobSpec
from orchestrator.data.decode import decode_image
from orchestrator.data.loaders import loader_workers, start_epoch, train_loader
from orchestrator.data.splits import DataError, Split, StreamedSplit
from orchestrator.train.loop import StepSettings, train_one_epoch
from orchestrator.train.lr_range import one_process
from orchestrator.train.pace import STALL_SHARE, pick_loader_workers, share_cpus, time_step

DOCTOR_STEPS = 30
"""optimizer steps of the timed pass (fewer when an epoch has fewer)"""


@dataclass
class Diagnosis:
    images_per_s: float
    """training images per second in the timed pass, waiting included"""
    data_wait_fraction: float
    """share of the timed pass the loop spent waiting for its next batch"""
    stages: dict[str, float]
    """milliseconds per micro-batch: read_ms, decode_ms, augment_ms (in one process), to_device_ms, step_ms"""
    advice: list[str]
    """the bottleneck first, then what to change"""

    def to_json(self) -> dict:
        return {"images_per_s": self.images_per_s, "data_wait_fraction": self.data_wait_fraction,
                "stages": self.stages, "advice": self.advice}


def stage_times(split, dataset, spec: JobSpec, batch_size: int, device: torch.device,
                model: torch.nn.Module) -> dict[str, float]:
    """Milliseconds per batch of each stage, measured one after another in this process (`dataset`: the
    split as the loader reads it, for in-memory arrays already resized)."""
    from orchestrator.data.transforms import build_transform

    transform = build_transform(spec.data, True, pre_sized=isinstance(split, Split) and split.kind == "array")
    started = time.perf_counter()
    encoded = _read(split, dataset, batch_size)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    decoded = [decode_image(blob, "doctor", spec.data.exif_transpose) if isinstance(blob, bytes) else blob
               for blob in encoded]
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    images = torch.stack([transform(image) for image in decoded]).float()
    augment_s = time.perf_counter() - started
    started = time.perf_counter()
    images.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    to_device_s = time.perf_counter() - started
    step_s = time_step(model, images, device)
    return {"read_ms": 1e3 * read_s, "decode_ms": 1e3 * decode_s, "augment_ms": 1e3 * augment_s,
            "to_device_ms": 1e3 * to_device_s, "step_ms": 1e3 * step_s}


def _read(split, dataset, batch_size: int) -> list:
    """A batch as stored: files' bytes, Parquet blobs, shard rows (bytes), or in-memory uint8 CHW tensors."""
    if isinstance(split, StreamedSplit):
        from orchestrator.data.shards import UnitReader, pieces

        order = list(range(len(split.units)))
        encoded, _ = UnitReader(split).rows(pieces(split, order, 0, min(batch_size, len(split))))
        return list(encoded)
    chosen = range(min(batch_size, len(split)))
    if split.kind == "path":
        return [Path(split.items[i]).read_bytes() for i in chosen]
    if split.kind == "bytes":
        return [bytes(split.items[i]) for i in chosen]
    return [torch.from_numpy(dataset.items[i]).permute(2, 0, 1) for i in chosen]


def advise(stages: dict[str, float], wait_fraction: float, workers: int, spec: JobSpec) -> list[str]:
    """The bottleneck stage and its knobs, from the stage times (ms a batch) and the measured wait."""
    data_ms = {name: stages[f"{name}_ms"] for name in ("read", "decode", "augment")}
    slowest = max(data_ms, key=data_ms.get)
    cpus = int(spec.scaling.cpus_per_worker)
    if wait_fraction <= STALL_SHARE:
        return [f"bottleneck: the step ({stages['step_ms']:.0f} ms a batch); the data keeps up (the loop waited "
                f"{100 * wait_fraction:.0f}% of the time, {workers} loader processes).",
                "faster steps: scaling.amp: bf16, scaling.channels_last: true, model.compile: true, a GPU "
                "(scaling.use_gpu), or more workers (scaling.num_workers)"]
    knobs = {
        "read": "pack the images into shards on fast storage (orchestrator pack), data.loader: ray_data for shards",
        "decode": "store smaller images (orchestrator pack SRC OUT --max-side 2x data.image_size), data.loader: "
                  "ray_data to decode on the cluster's other CPUs",
        "augment": "cheaper or fewer data.augment entries",
    }
    return [f"bottleneck: {slowest} ({data_ms[slowest]:.0f} ms a batch of {spec.scaling.per_worker_batch_size} in one "
            f"process, the step {stages['step_ms']:.0f} ms); the loop waited {100 * wait_fraction:.0f}% of the time "
            f"for data with {workers} loader processes.",
            f"more loader processes: data.loader_workers (at most {max(0, cpus - 1)} with scaling.cpus_per_worker "
            f"{cpus}; raise that for more)", knobs[slowest]]


def diagnose(spec: JobSpec, steps: int = DOCTOR_STEPS) -> Diagnosis:
    """Time the job's stages and a short real pass in this process (see the module's docstring)."""
    run = one_process(spec, lambda message: DataError(f"{message}; doctor times the job's own data"))
    one, plan, trainee, train_set = run.spec, run.plan, run.trainee, run.train_set
    device = next(trainee.model.parameters()).device
    workers = loader_workers(one.data, one.scaling.cpus_per_worker)
    if workers is None:
        workers, _ = pick_loader_workers(one, train_set, trainee.model, device, plan.per_worker_batch_size)
    share_cpus(one.scaling.cpus_per_worker, workers, device)
    stages = stage_times(run.splits.train, train_set, one, plan.per_worker_batch_size, device, trainee.model)
    loader = train_loader(train_set, one.data, plan, 0, one.seed, run.num_classes, workers)
    start_epoch(loader, 0)
    settings = StepSettings(min(steps, plan.steps_per_epoch), plan.grad_accum_steps, lambda step: 0.0, device,
                            one.scaling.amp, one.scaling.channels_last, None, 0.0, (one.data.mean, one.data.std))
    stats = train_one_epoch(trainee, loader, settings, 0, 0)   # LR 0: the weights do not move
    wait_fraction = stats.data_wait_s / stats.seconds if stats.seconds > 0 else 0.0
    return Diagnosis(stats.images / stats.seconds if stats.seconds > 0 else 0.0, wait_fraction, stages,
                     advise(stages, wait_fraction, workers, one))
