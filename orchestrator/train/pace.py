"""Which side of a step is slower, the data or the model: timings of a few batches at the start of a run.

`pick_loader_workers` (data.loader_workers: auto) times a batch's read+decode+augment in this process
and a training step on a copy of the model, and picks the loader processes that make a step shortest.
`stall_line` is the line a run prints after an epoch that waited for its data. Imports no Ray.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from orchestrator.config.spec import JobSpec

STALL_SHARE = 0.15
"""an epoch that waited for data longer than this share of its training time gets a stall line"""


def predicted_step_s(workers: int, data_s: float, step_s: float, cpus: int, on_cpu: bool) -> float:
    """Seconds per step with `workers` loader processes: in-process (0) a step decodes then computes; with
    workers they decode in parallel, and on a CPU device each takes a core from the step's cpus."""
    if workers == 0:
        return data_s + step_s
    compute_s = step_s * cpus / (cpus - workers) if on_cpu and workers < cpus else step_s
    return max(compute_s, data_s / workers)


def choose_workers(data_s: float, step_s: float, cpus: int, on_cpu: bool) -> int:
    """The loader processes (0 .. cpus - 1) with the shortest predicted step; ties go to fewer."""
    options = range(0, max(1, cpus))
    return min(options, key=lambda w: (round(predicted_step_s(w, data_s, step_s, cpus, on_cpu), 6), w))


def time_batches(dataset, batch_size: int, batches: int = 2) -> float:
    """Seconds to read, decode and augment one batch in this process (the mean of `batches`, after one)."""
    if hasattr(dataset, "split") and not hasattr(dataset, "items"):   # a stream: batches come whole
        stream = iter(dataset.split.eval_stream(dataset.transform, batch_size, 0, 1))
        next(stream)
        started = time.perf_counter()
        for _ in range(batches):
            if next(stream, None) is None:
                break
        return (time.perf_counter() - started) / batches
    count = min(len(dataset), batch_size * (batches + 1))
    dataset[0]
    started = time.perf_counter()
    for index in range(1, count):
        dataset[index]
    return (time.perf_counter() - started) / max(1, count - 1) * batch_size


def time_step(model: torch.nn.Module, images: torch.Tensor, device: torch.device, steps: int = 2) -> float:
    """Seconds of a forward and backward pass over `images` on a copy of the model (the run's weights
    and statistics are not touched); the mean of `steps` after a warm-up one."""
    trial = copy.deepcopy(model).to(device).train()
    images = images.to(device)
    labels = torch.zeros(len(images), dtype=torch.long, device=device)

    def one() -> None:
        output = trial(images)
        logits = output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output
        torch.nn.functional.cross_entropy(logits, labels).backward()

    one()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    return (time.perf_counter() - started) / steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_loader_workers(spec: JobSpec, dataset, model: torch.nn.Module, device: torch.device,
                        batch_size: int) -> tuple[int, str]:
    """(loader processes, why) for data.loader_workers: auto, from this run's own data and model."""
    cpus = max(1, int(spec.scaling.cpus_per_worker))
    data_s = time_batches(dataset, batch_size)
    images = torch.rand(batch_size, 3, spec.data.image_size, spec.data.image_size)
    step_s = time_step(model, images, device)
    on_cpu = device.type == "cpu"
    workers = choose_workers(data_s, step_s, cpus, on_cpu)
    shown = f"{workers} (in-process)" if workers == 0 else str(workers)
    why = (f"data.loader_workers auto: {shown}; a batch of {batch_size} takes {data_s * 1e3:.0f} ms to read, "
           f"decode and augment here, a step {step_s * 1e3:.0f} ms on {device.type}"
           + (f" sharing {cpus} CPUs with the loaders" if on_cpu else f", {cpus - 1} CPUs free for loaders"))
    return workers, why


def share_cpus(cpus_per_worker: float, workers: int, device: torch.device) -> str | None:
    """On a CPU device with loader processes, give the step the CPUs they leave (torch.set_num_threads,
    at least 1), so the two do not fight over the same cores; returns the line that says so, or None
    (no loader processes, or a GPU: threads unchanged)."""
    cpus = max(1, int(cpus_per_worker))
    if device.type != "cpu" or workers <= 0:
        return None
    threads = max(1, cpus - workers)
    torch.set_num_threads(threads)
    return f"torch threads: {threads} (scaling.cpus_per_worker {cpus} less {workers} loader process(es))"


def stall_line(row: dict, spec: JobSpec, workers: int) -> str | None:
    """The doctor's line after an epoch that waited for its data more than STALL_SHARE of its training
    time: what, how much, and the knobs (None when the data kept up)."""
    wait_s, train_s = row.get("data_wait_s") or 0.0, row.get("train_s") or 0.0
    if train_s <= 0 or wait_s <= STALL_SHARE * train_s:
        return None
    cpus = int(spec.scaling.cpus_per_worker)
    knobs = [f"data.loader_workers (now {workers}; at most {max(0, cpus - 1)} with scaling.cpus_per_worker {cpus}, "
             "raise that for more)"]
    if spec.data.source_kind in ("imagefolder", "parquet", "shards"):
        knobs.append("smaller stored images (orchestrator pack SRC OUT --max-side 2x data.image_size)")
    if spec.data.source_kind == "shards":
        knobs.append("data.loader: ray_data (decoding on the cluster's other CPUs)")
    if spec.data.augment:
        knobs.append("cheaper data.augment entries")
    share = math.floor(100 * wait_s / train_s)
    return (f"data stall: epoch {row['epoch'] + 1} waited {wait_s:.1f} s of its {train_s:.1f} s of training ({share}%) "
            f"for the next batch; the step was faster than the loader. Try: {'; '.join(knobs)}. "
            "`orchestrator doctor JOB` times each stage")
