"""Datasets and seeded loaders over the splits of `data.sources`, sharded by rank.

Training batches come from `GlobalBatchSampler` (every optimizer step sees the plan's global batch,
the same images at any world size; `start_epoch` reshuffles), evaluation by `rank::world` strides
with no padding, so every image counts once. A `StreamedSplit` (packed shards) gives its own streams
with the same contracts. Each training image's augmentation is drawn with a torch seed fixed by its
place in the epoch, so an epoch resumed at step s draws what an unbroken one does.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.transforms import v2

from orchestrator.config.catalog import SOURCES
from orchestrator.config.plan import Plan
from orchestrator.config.spec import DataSpec
from orchestrator.data.decode import decode_image
from orchestrator.data.splits import Split, StreamedSplit, seed_base
from orchestrator.data.transforms import build_transform, delivers_uint8, resize_array

EVAL_BATCH_SIZE = 256
"""images per evaluation batch (validation, test, evaluate, predict)"""


class ImageDataset(Dataset):
    """(normalised image, label) pairs of one split."""

    def __init__(self, split: Split, transform: v2.Compose, image_size: int, name: str, exif_transpose: bool = True):
        self.kind = split.kind
        self.items = resize_array(split.items, image_size) if split.kind == "array" else split.items
        self.labels = torch.as_tensor(split.labels, dtype=torch.long)
        self.transform = transform
        self.name = name
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`index`, or (index, torch seed of its augmentation) as GlobalBatchSampler yields them."""
        if isinstance(index, tuple):
            index, augment_seed = index
            torch.default_generator.manual_seed(augment_seed)   # the CPU generator only (see streaming.py)
        item = self.items[index]
        if self.kind == "array":
            image = torch.from_numpy(item).permute(2, 0, 1)
        elif self.kind == "bytes":
            image = decode_image(item, f"{self.name} row {index}", self.exif_transpose)
        else:
            image = decode_image(item, item, self.exif_transpose)
        return self.transform(image), self.labels[index]


class StreamedDataset:
    """A `StreamedSplit` with its transform: what train_loader / eval_loader stream from."""

    def __init__(self, split, transform: v2.Compose):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)


def make_dataset(split, data: DataSpec, train: bool, name: str) -> ImageDataset | StreamedDataset:
    """`split`: a `Split` held in memory, or a `StreamedSplit` (read as the loaders go). Training images
    come out uint8 when `delivers_uint8(data)` (the loop normalises them)."""
    streamed = isinstance(split, StreamedSplit)
    transform = build_transform(data, train, pre_sized=not streamed and split.kind == "array",
                                uint8_out=train and delivers_uint8(data))
    if streamed:
        return StreamedDataset(split, transform)
    return ImageDataset(split, transform, data.image_size, name, data.exif_transpose)


def loader_workers(data: DataSpec, cpus_per_worker: float) -> int | None:
    """data.loader_workers when a number; for auto, 0 for in-memory arrays or when the worker has no CPU
    beside the one that trains, else None: to be measured (train/pace.py picks it)."""
    if data.loader_workers != "auto":
        return data.loader_workers
    return 0 if SOURCES[data.source_kind].in_memory or int(cpus_per_worker) < 2 else None


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each loader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's share of every global batch; the global batches depend on (seed, epoch) only.

    Each epoch a permutation of the dataset (seeded by seed and epoch, the same on every rank) is cut
    into global batches of per_worker_batch_size x world_size x grad_accum_steps images, the rest
    dropped. Micro-step a of rank r takes images [(a x world + r) x B, (a x world + r + 1) x B) of
    each global batch. So every optimizer step sees the same images whatever the world size: 2
    workers x B compute what 1 worker x 2B does.

    Yields (index, augmentation seed): the seed is fixed by the image's place in the epoch's order.
    `set_epoch(epoch, skip_batches)` skips the first skip_batches of this rank's micro-batches (whole
    optimizer steps: a mid-epoch resume), without touching their images.
    """

    def __init__(self, num_samples: int, per_worker_batch_size: int, world_size: int, rank: int,
                 grad_accum_steps: int, seed: int, weights: torch.Tensor | None = None):
        self.weights = weights
        """data.sampler: balanced: each image's chance to be drawn (with replacement) instead of a permutation"""
        self.num_samples, self.batch, self.world, self.rank = num_samples, per_worker_batch_size, world_size, rank
        self.accum, self.seed, self.epoch, self.skip_steps = grad_accum_steps, seed, 0, 0
        self.global_batch = per_worker_batch_size * world_size * grad_accum_steps
        self.steps = num_samples // self.global_batch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_steps = epoch, skip_batches // self.accum

    def __len__(self) -> int:
        return (self.steps - self.skip_steps) * self.accum * self.batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist()
        base = seed_base(self.seed, self.epoch)
        for step in range(self.skip_steps, self.steps):
            for micro in range(self.accum):
                start = step * self.global_batch + (micro * self.world + self.rank) * self.batch
                for position in range(start, start + self.batch):
                    yield order[position], base + position


def balanced_weights(labels: np.ndarray) -> torch.Tensor:
    """Each image's chance under data.sampler: balanced: 1 / its class's images, so every class is drawn
    equally often in expectation."""
    counts = np.bincount(labels)
    return torch.from_numpy(1.0 / counts[labels]).double()


class MixBatches:
    """collate_fn: stack a batch, then MixUp or CutMix it (torchvision v2; one of them per batch when both
    are on). Labels become class probabilities (N, classes). Draws from torch's RNG, seeded per epoch."""

    def __init__(self, data: DataSpec, num_classes: int):
        mixers = []
        if data.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=data.mixup_alpha, num_classes=num_classes))
        if data.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=data.cutmix_alpha, num_classes=num_classes))
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def __call__(self, batch):
        from torch.utils.data import default_collate

        return self.mix(*default_collate(batch))


def train_loader(dataset: Dataset | StreamedDataset, data: DataSpec, plan: Plan, rank: int, seed: int,
                 num_classes: int | None = None, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """This rank's micro-batches of the plan's global batches, reshuffled by `start_epoch`; mixed
    by MixUp/CutMix when data.mixup_alpha or data.cutmix_alpha is set (needs `num_classes`).
    `workers`: DataLoader worker processes (see `loader_workers`), alive for the whole run: each epoch's
    order reaches them through the sampler (in this process) or the stream's shared epoch state.
    `pin_memory`: batches in page-locked memory, for non-blocking copies to a GPU. With data.decode: gpu
    a stream yields encoded batches (wrap the loader in device_decode.DeviceDecoded)."""
    generator = torch.Generator().manual_seed(seed + rank)
    mixing = data.mixup_alpha > 0 or data.cutmix_alpha > 0
    if mixing and num_classes is None:
        raise ValueError("train_loader: MixUp/CutMix need num_classes")
    if isinstance(dataset, StreamedDataset):
        stream = dataset.split.train_stream(None if data.decode == "gpu" else dataset.transform, plan.per_worker_batch_size,
                                            plan.steps_per_epoch * plan.grad_accum_steps, rank, plan.world_size, seed,
                                            mix=MixBatches(data, num_classes).mix if mixing else None)
        return DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=seed_worker, generator=generator,
                          persistent_workers=workers > 0, pin_memory=pin_memory)
    sampler = GlobalBatchSampler(len(dataset), plan.per_worker_batch_size, plan.world_size, rank, plan.grad_accum_steps, seed,
                                 balanced_weights(dataset.labels.numpy()) if data.sampler == "balanced" else None)
    return DataLoader(dataset, batch_size=plan.per_worker_batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, worker_init_fn=seed_worker, generator=generator,
                      collate_fn=MixBatches(data, num_classes) if mixing else None, persistent_workers=workers > 0,
                      pin_memory=pin_memory)


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Set the loader's epoch (its order) and how many of this rank's micro-batches to skip (a mid-epoch resume)."""
    target = loader.dataset if isinstance(loader.dataset, IterableDataset) else loader.sampler
    target.set_epoch(epoch, skip_batches)


def eval_loader(dataset: Dataset | StreamedDataset, data: DataSpec, batch_size: int, rank: int, world_size: int,
                workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """In order, strided by rank (packed shards: a contiguous share), nothing padded or dropped: the shares sum to the split."""
    if isinstance(dataset, StreamedDataset):
        stream = dataset.split.eval_stream(dataset.transform, batch_size, rank, world_size)
        return DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=seed_worker,
                          persistent_workers=workers > 0, pin_memory=pin_memory)
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
                      worker_init_fn=seed_worker, persistent_workers=workers > 0, pin_memory=pin_memory)
