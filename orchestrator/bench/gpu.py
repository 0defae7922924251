"""`orchestrator bench gpu`: a training step's images/s on the device against what the data path delivers.

ResNet-50 (by default) at 224 px, bf16 autocast, channels_last (`--compile`: torch.compile too), SGD:
- bound: `steps` steps on random tensors already on the device (no data path at all);
- images_per_s: the same steps through the real data path: generated photo-like JPEGs packed into
  shards (`orchestrator pack`), the shards DataLoader with every CPU but one as loader processes and
  pinned memory, decoded on the device (`data.decode: gpu`) when it is a GPU, else in the loaders.
ratio = images_per_s / bound; data_wait_fraction = the share of the real pass spent waiting for a batch.
Runs on whatever device there is (a CPU here, with smaller settings in the tests); it says which.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from orchestrator.bench.common import figures_table


def _step_settings(device: torch.device, steps: int, mean_std: tuple):
    from orchestrator.train.loop import StepSettings

    return StepSettings(steps, 1, lambda step: 1.0, device, "bf16", True, None, 0.0, mean_std)


def bound_rate(model: torch.nn.Module, optimizer, device: torch.device, batch: int, size: int, steps: int) -> float:
    """Images/s of `steps` training steps on random tensors already on the device (after 2 warm-up steps)."""
    from orchestrator.train.loop import Trainee, train_one_epoch

    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    mean_std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    trainee = Trainee(model, optimizer)
    train_one_epoch(trainee, [(images, labels)] * 2, _step_settings(device, 2, mean_std), 0, 0)
    stats = train_one_epoch(trainee, [(images, labels)] * steps, _step_settings(device, steps, mean_std), 0, 2)
    return stats.images / stats.seconds


def loader_rate(model, optimizer, device: torch.device, batch: int, size: int, steps: int, folder: Path) -> tuple[float, float]:
    """(images/s, share of the time waiting for data) of `steps` steps through packed shards and the real loader."""
    from orchestrator.bench.ingest import make_jpegs
    from orchestrator.config.plan import make_plan
    from orchestrator.config.spec import JobSpec
    from orchestrator.data.device_decode import DeviceDecoded
    from orchestrator.data.loaders import make_dataset, start_epoch, train_loader
    from orchestrator.data.pack import pack
    from orchestrator.data.sources import load_splits
    from orchestrator.train.loop import Trainee, train_one_epoch

    make_jpegs(folder / "tree", batch * (steps + 2))
    pack(str(folder / "tree"), str(folder / "shards"), shard_size_mb=64)
    on_gpu = device.type == "cuda"
    spec = JobSpec.model_validate({"name": "bench-gpu", "data": {
        "source": f"shards:{folder / 'shards'}", "image_size": size, "augment": ["random_resized_crop", "hflip"],
        "decode": "gpu" if on_gpu else "cpu", "val_fraction": 0.05},
        "scaling": {"num_workers": 1, "per_worker_batch_size": batch, "use_gpu": on_gpu}})
    splits = load_splits(spec.data, 0)
    dataset = make_dataset(splits.train, spec.data, True, "train")
    loader = train_loader(dataset, spec.data, make_plan(spec, len(splits.train), 1), 0, 0, splits.num_classes,
                          max(1, (os.cpu_count() or 2) - 1), pin_memory=on_gpu)
    start_epoch(loader, 0)
    batches = DeviceDecoded(loader, dataset.transform, device) if on_gpu else loader
    settings = _step_settings(device, min(steps, len(loader)), (spec.data.mean, spec.data.std))
    stats = train_one_epoch(Trainee(model, optimizer), batches, settings, 0, 0)
    return stats.images / stats.seconds, stats.data_wait_s / stats.seconds


def gpu_bench(console: Console, arch: str = "resnet50", batch: int = 64, size: int = 224, steps: int = 30,
              compiled: bool = False) -> dict:
    """Both rates on this machine's device; returns the figures (see the module's docstring)."""
    import torchvision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no GPU here)"
    console.print(f"device: {name}; {arch}, {size} px, batch {batch}, bf16, channels_last"
                  + (", torch.compile" if compiled else ""))
    model = torchvision.models.get_model(arch, num_classes=10).to(device, memory_format=torch.channels_last)
    if compiled:
        model.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]   # the loop sets each step's LR from it (factor 1 here)
    started = time.perf_counter()
    bound = bound_rate(model, optimizer, device, batch, size, steps)
    with tempfile.TemporaryDirectory() as folder:
        real, waiting = loader_rate(model, optimizer, device, batch, size, steps, Path(folder))
    console.print(f"measured in {time.perf_counter() - started:.0f} s")
    return {"device": name, "bound_images_per_s": bound, "images_per_s": real, "ratio": real / bound,
            "data_wait_fraction": waiting}


def print_gpu(console: Console, figures: dict) -> None:
    table = figures_table(f"training images/s on {figures['device']}", ("path", "images/s", "ratio to bound"))
    table.add_row("bound: tensors already on the device", f"{figures['bound_images_per_s']:.0f}", "1.000")
    table.add_row("packed shards through the loader", f"{figures['images_per_s']:.0f}", f"{figures['ratio']:.3f}")
    console.print(table)
    console.print(f"waiting for data: {100 * figures['data_wait_fraction']:.0f}% of the real pass")
