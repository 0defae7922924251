"""`orchestrator bench ingest`: images per second delivered to a training loop, against the bound.

On the same generated JPEGs (photo-like, about 400 x 350 pixels, 10 classes) and the same training
transform (random_resized_crop to IMAGE_SIZE, hflip, normalise), with one process per core:
- bound: the decode + augment + collate alone, in one plain process per core over bytes already in
  memory (no loader, no files, no queues); it stops where the loaders stop, at uint8 crops (the
  training loop normalises them on its device);
- imagefolder: the DataLoader over the image files (`imagefolder:`), cores workers;
- shards: `orchestrator pack` of the same tree, then the shards DataLoader (`shards:`), cores workers;
- ray_data: the same shards through `data.loader: ray_data`'s dataset, read by the driver.
Each path is timed from the start of each pass (loader workers forked, Ray Data's tasks started) to
its last batch, over `--epochs` passes; Ray's own start is left out. While the shards path runs, the
private memory of its loader workers (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup: what
a worker holds beyond the pages it shares with the trainer) is sampled at every batch; the peak is
reported: run at two `--images` to see that it does not grow with the dataset.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

IMAGE_SIZE = 224
BATCH = 64
CLASSES = 10
AUGMENT = ["random_resized_crop", "hflip"]


def make_jpegs(root: Path, count: int, seed: int = 0) -> Path:
    """`count` photo-like JPEGs (smooth colour fields plus grain, 320-480 x 280-420 px, quality 90) in
    root/train/<class>/ and a tenth as many in root/val/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("val", max(CLASSES, count // 10))):
        for i in range(n):
            label = i % CLASSES
            width, height = int(rng.integers(320, 481)), int(rng.integers(280, 421))
            field = rng.normal(128, 60, (6, 7, 3)) + 8 * label
            image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
            pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 10, (height, width, 3))
            folder = root / split / f"class_{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def data_spec(source: str, workers: int):
    from orchestrator.config.spec import DataSpec

    return DataSpec(source=source, image_size=IMAGE_SIZE, augment=AUGMENT, loader_workers=workers)


def _bound_worker(blobs: list[bytes], results) -> None:
    import torch

    from orchestrator.data.decode import decode_image
    from orchestrator.data.transforms import build_transform, delivers_uint8

    torch.set_num_threads(1)
    data = data_spec("builtin:digits", 0)
    transform = build_transform(data, True, pre_sized=False, uint8_out=delivers_uint8(data))   # what loader workers run
    started = time.perf_counter()
    for first in range(0, len(blobs), BATCH):
        torch.stack([transform(decode_image(blob, "bench")) for blob in blobs[first:first + BATCH]])
    results.put((len(blobs), time.perf_counter() - started))


def bound(paths: list[Path], cores: int) -> float:
    """Images per second of decode + augment + collate in `cores` plain processes over in-memory bytes."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    blobs = [p.read_bytes() for p in paths]
    workers = [context.Process(target=_bound_worker, args=(blobs[i::cores], results)) for i in range(cores)]
    for worker in workers:
        worker.start()
    done = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    return sum(count / seconds for count, seconds in done)


def drain(batches, epochs: int, on_batch=None) -> float:
    """Images per second of an epoch -> batches factory, each pass timed from its start to its last batch."""
    images, seconds = 0, 0.0
    for epoch in range(epochs):
        started = time.perf_counter()
        for batch_images, _ in batches(epoch):
            images += len(batch_images)
            if on_batch:
                on_batch()
        seconds += time.perf_counter() - started
    return images / seconds


def private_mb(pid: int) -> float:
    """Memory only this process holds (not shared with its parent), MB; 0 when it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except (OSError, ValueError):
        return 0.0
    return sum(int(fields.get(key, "0 kB").split()[0]) for key in ("Private_Clean", "Private_Dirty")) / 1024


class PeakWorkerMemory:
    """Samples this process's children (the DataLoader's workers) and keeps the largest private memory seen."""

    def __init__(self):
        self.peak_mb = 0.0

    def __call__(self) -> None:
        for child in multiprocessing.active_children():
            self.peak_mb = max(self.peak_mb, private_mb(child.pid))


def torch_loader_rate(source: str, workers: int, epochs: int, on_batch=None) -> float:
    import torch

    from orchestrator.config.plan import make_plan
    from orchestrator.config.spec import JobSpec
    from orchestrator.data.loaders import make_dataset, start_epoch, train_loader
    from orchestrator.data.sources import load_splits

    torch.set_num_threads(1)
    data = data_spec(source, workers)
    splits = load_splits(data, 0)
    spec = JobSpec.model_validate({"data": data.model_dump(), "scaling": {"num_workers": 1, "per_worker_batch_size": BATCH}})
    plan = make_plan(spec, len(splits.train), world_size=1)
    loader = train_loader(make_dataset(splits.train, data, True, "train"), data, plan, 0, 0, workers=workers)

    def batches(epoch: int):
        start_epoch(loader, epoch)
        return loader

    return drain(batches, epochs, on_batch)


def ray_data_rate(source: str, cores: int, epochs: int) -> float:
    import ray

    from orchestrator.cluster.ray_data import train_dataset
    from orchestrator.data.sources import load_splits

    data = data_spec(source, 0)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=cores, log_to_driver=False, configure_logging=False, include_dashboard=False)
    try:
        dataset = train_dataset(data, load_splits(data, 0).train)

        def batches(epoch: int):
            return ((b["image"], b["label"]) for b in dataset.iter_torch_batches(batch_size=BATCH, drop_last=True))

        return drain(batches, epochs)
    finally:
        if started_here:
            ray.shutdown()


def ingest(console: Console, images: int = 2000, epochs: int = 2, keep: str | None = None) -> dict:
    """Measure every path; returns {"bound_images_per_s", "paths": {...}, "loader_worker_private_mb", "images", "cores"}."""
    from orchestrator.data.pack import pack

    cores = os.cpu_count() or 1
    work = Path(keep or tempfile.mkdtemp(prefix="orchestrator-ingest-"))
    try:
        tree = work / "tree"
        if not (tree / "train").is_dir():
            console.print(f"[dim]generating {images} JPEGs in {tree} ...[/dim]")
            make_jpegs(tree, images)
        paths = sorted((tree / "train").rglob("*.jpg"))
        console.print("[dim]packing them into shards ...[/dim]")
        pack(str(tree), str(work / "packed"), workers=cores)
        console.print(f"[dim]bound: decode + augment + collate in {cores} plain processes ...[/dim]")
        figures = {"bound_images_per_s": round(bound(paths, cores), 1), "paths": {}}
        console.print("[dim]imagefolder DataLoader ...[/dim]")
        figures["paths"]["imagefolder"] = round(torch_loader_rate(f"imagefolder:{tree}", cores, epochs), 1)
        console.print("[dim]shards DataLoader ...[/dim]")
        memory = PeakWorkerMemory()
        figures["paths"]["shards"] = round(torch_loader_rate(f"shards:{work / 'packed'}", cores, epochs, memory), 1)
        console.print("[dim]Ray Data ...[/dim]")
        figures["paths"]["ray_data"] = round(ray_data_rate(f"shards:{work / 'packed'}", cores, epochs), 1)
        figures.update(loader_worker_private_mb=round(memory.peak_mb, 1), images=len(paths), cores=cores)
        return figures
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def print_ingest(console: Console, figures: dict) -> None:
    table = Table(title=f"images/s delivered to a training loop: {figures['images']} JPEGs, {IMAGE_SIZE} px crops, "
                        f"{figures['cores']} cores", title_justify="left")
    for column in ("path", "images/s", "of the bound"):
        table.add_column(column, justify="right" if column != "path" else "left")
    bound_rate = figures["bound_images_per_s"]
    table.add_row("bound (decode + augment alone)", f"{bound_rate:.0f}", "1.00")
    for name, rate in figures["paths"].items():
        table.add_row(name, f"{rate:.0f}", f"{rate / bound_rate:.2f}")
    console.print(table)
    console.print(f"shards: a loader worker's peak private memory {figures['loader_worker_private_mb']:.0f} MB "
                  "(beyond what it shares with the trainer)")

