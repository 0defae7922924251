"""Datasets, augmentation presets and seeded loaders over the splits of `data.sources`.

Images become uint8 CHW tensors, pass the augmentations named in `data.augment` (training only;
`data.augment`'s registry, torch-free for the spec's validation),
then are resized to `image_size`, scaled to [0, 1] and normalised. In-memory sources are resized
once up front. An image that cannot be decoded raises `ImageReadError` with its path.
Loaders shard by rank: training with `GlobalBatchSampler` (every optimizer step sees the plan's
global batch, the same images at any world size; set_epoch reshuffles), evaluation by
`rank::world` strides with no padding, so every image counts once. Packed shards (`shards:`) stream
through `data.streaming` with the same contracts. Each training image's augmentation is drawn with a
torch seed fixed by its place in the epoch, so an epoch resumed at step s draws what an unbroken one does.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.transforms import v2

from orchestrator.data.sources import Split
from orchestrator.plan import Plan
from orchestrator.data.augment import AUGMENTATIONS, FLOAT_ONLY, augmentation_entry
from orchestrator.spec import DataSpec


class ImageReadError(Exception):
    """An image file or blob that cannot be decoded."""


class RandomRotate90(torch.nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees, chosen uniformly."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, int(torch.randint(0, 4, ())), dims=(-2, -1))

    def __repr__(self) -> str:
        return "RandomRotate90()"


def eval_transform(image_size: int, mean, std, resize: int | None = None) -> v2.Compose:
    """The evaluation transform of a run, from its data keys alone (what `predict` applies to a file):
    uint8 CHW -> resize the short side to `resize` (data.eval_resize; default image_size), center crop
    image_size, scale to [0, 1], normalise."""
    return v2.Compose([v2.Resize(resize or image_size, antialias=True), v2.CenterCrop(image_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])


def delivers_uint8(data: DataSpec) -> bool:
    """Whether training batches leave the loader as uint8 and are normalised by the training loop (on its
    device): 4x less to move from loader workers (+30-60% images/s here, `bench ingest`). Not when an
    augmentation works on floats (`FLOAT_ONLY`) or MixUp/CutMix mix the batch in the loader."""
    names = [augmentation_entry(entry)[0] for entry in data.augment]
    return not any(name in FLOAT_ONLY for name in names) and data.mixup_alpha == 0 and data.cutmix_alpha == 0


def normalize_batch(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> what build_transform's last two steps give each image (bitwise the same)."""
    return v2.functional.normalize(v2.functional.to_dtype(images, torch.float32, scale=True), list(mean), list(std))


def build_transform(data: DataSpec, train: bool, pre_sized: bool, uint8_out: bool = False) -> v2.Compose:
    """uint8 CHW tensor -> normalised float tensor of image_size x image_size (with `uint8_out`, a training
    transform that stops before the float conversion: see `delivers_uint8`).

    Training augmentations run in the order written; a resize to image_size comes first unless a
    random_resized_crop makes the size (or the images are already sized).
    """
    size = data.image_size
    if not train and (not pre_sized or data.eval_resize is not None):
        return eval_transform(size, data.mean, data.std, data.eval_resize)
    entries = [augmentation_entry(entry) for entry in data.augment] if train else []
    steps: list[torch.nn.Module] = []
    if "random_resized_crop" not in [name for name, _ in entries] and not pre_sized:
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    is_float = False
    for name, arguments in entries:
        if name in FLOAT_ONLY and not is_float:
            steps.append(v2.ToDtype(torch.float32, scale=True))
            is_float = True
        steps.append(AUGMENTATIONS[name](size, **arguments))
    if uint8_out and train and not is_float:
        return v2.Compose(steps or [v2.Identity()])
    if not is_float:
        steps.append(v2.ToDtype(torch.float32, scale=True))
    steps.append(v2.Normalize(mean=list(data.mean), std=list(data.std)))
    return v2.Compose(steps)


def resize_array(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, S, S, 3) uint8, bilinear with antialias, done once."""
    if images.shape[1:3] == (image_size, image_size):
        return images
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    resized = torch.nn.functional.interpolate(tensor, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def decode_image(blob_or_path, where: str) -> torch.Tensor:
    """Encoded bytes or a file path -> uint8 CHW RGB tensor, or ImageReadError naming `where`.

    PIL reads the header (and refuses a decompression bomb); JPEGs are then decoded by torchvision's
    libjpeg-turbo `decode_jpeg` (1.4x PIL's decode + convert + copy here: `orchestrator bench ingest`
    measures both), other formats by PIL.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = bytes(blob_or_path) if isinstance(blob_or_path, (bytes, bytearray)) else Path(blob_or_path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and img.mode in ("RGB", "L"):
                return _decode_jpeg(data, where)
            array = np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"image {where} is too large to decode safely: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"cannot read image {where}: {_without_object_repr(exc)}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _decode_jpeg(data: bytes, where: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise ImageReadError(f"cannot read image {where}: {' '.join(str(exc).split())[:200]}") from None


def _without_object_repr(exc: Exception) -> str:
    """PIL names a BytesIO by its repr ('<_io.BytesIO object at 0x...>'); say 'it' instead."""
    import re

    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "it", str(exc))


class ImageDataset(Dataset):
    """(normalised image, label) pairs of one split."""

    def __init__(self, split: Split, transform: v2.Compose, image_size: int, name: str):
        self.kind = split.kind
        self.items = resize_array(split.items, image_size) if split.kind == "array" else split.items
        self.labels = torch.as_tensor(split.labels, dtype=torch.long)
        self.transform = transform
        self.name = name

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
            image = decode_image(item, f"{self.name} row {index}")
        else:
            image = decode_image(item, item)
        return self.transform(image), self.labels[index]


class PackedSplit:
    """A split of packed shards with its transform: what train_loader / eval_loader stream from."""

    def __init__(self, split, transform: v2.Compose):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)


def make_dataset(split, data: DataSpec, train: bool, name: str) -> ImageDataset | PackedSplit:
    """`split`: a `Split`, or a `ShardSplit` of packed shards (streamed, never held in memory). Training
    images come out uint8 when `delivers_uint8(data)` (the loop normalises them)."""
    transform = build_transform(data, train, pre_sized=split.kind == "array", uint8_out=train and delivers_uint8(data))
    if split.kind == "shards":
        return PackedSplit(split, transform)
    return ImageDataset(split, transform, data.image_size, name)


def loader_workers(data: DataSpec, cpus_per_worker: float) -> int:
    """data.loader_workers, or by default: none for in-memory arrays, else one per CPU of the worker beyond
    the one that trains (decoding encoded images is the work)."""
    if data.loader_workers is not None:
        return data.loader_workers
    return 0 if data.source_kind in ("builtin", "synthetic") else max(0, int(cpus_per_worker) - 1)


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
                 grad_accum_steps: int, seed: int):
        self.num_samples, self.batch, self.world, self.rank = num_samples, per_worker_batch_size, world_size, rank
        self.accum, self.seed, self.epoch, self.skip_steps = grad_accum_steps, seed, 0, 0
        self.global_batch = per_worker_batch_size * world_size * grad_accum_steps
        self.steps = num_samples // self.global_batch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_steps = epoch, skip_batches // self.accum

    def __len__(self) -> int:
        return (self.steps - self.skip_steps) * self.accum * self.batch

    def __iter__(self):
        from orchestrator.data.shards import seed_base

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        base = seed_base(self.seed, self.epoch)
        for step in range(self.skip_steps, self.steps):
            for micro in range(self.accum):
                start = step * self.global_batch + (micro * self.world + self.rank) * self.batch
                for position in range(start, start + self.batch):
                    yield order[position], base + position


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


def train_loader(dataset: Dataset | PackedSplit, data: DataSpec, plan: Plan, rank: int, seed: int,
                 num_classes: int | None = None, workers: int = 0) -> DataLoader:
    """This rank's micro-batches of the plan's global batches, reshuffled by `start_epoch`; mixed
    by MixUp/CutMix when data.mixup_alpha or data.cutmix_alpha is set (needs `num_classes`).
    `workers`: DataLoader worker processes (see `loader_workers`)."""
    generator = torch.Generator().manual_seed(seed + rank)
    mixing = data.mixup_alpha > 0 or data.cutmix_alpha > 0
    if mixing and num_classes is None:
        raise ValueError("train_loader: MixUp/CutMix need num_classes")
    if isinstance(dataset, PackedSplit):
        from orchestrator.data.streaming import ShardTrainStream

        stream = ShardTrainStream(dataset.split, dataset.transform, plan.per_worker_batch_size,
                                  plan.steps_per_epoch * plan.grad_accum_steps, rank, plan.world_size, seed,
                                  mix=MixBatches(data, num_classes).mix if mixing else None)
        return DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=seed_worker, generator=generator)
    sampler = GlobalBatchSampler(len(dataset), plan.per_worker_batch_size, plan.world_size, rank, plan.grad_accum_steps, seed)
    return DataLoader(dataset, batch_size=plan.per_worker_batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, worker_init_fn=seed_worker, generator=generator,
                      collate_fn=MixBatches(data, num_classes) if mixing else None)


def start_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Set the loader's epoch (its order) and how many of this rank's micro-batches to skip (a mid-epoch resume)."""
    target = loader.dataset if isinstance(loader.dataset, IterableDataset) else loader.sampler
    target.set_epoch(epoch, skip_batches)


def eval_loader(dataset: Dataset | PackedSplit, data: DataSpec, batch_size: int, rank: int, world_size: int,
                workers: int = 0) -> DataLoader:
    """In order, strided by rank (packed shards: a contiguous share), nothing padded or dropped: the shares sum to the split."""
    if isinstance(dataset, PackedSplit):
        from orchestrator.data.streaming import ShardEvalStream

        stream = ShardEvalStream(dataset.split, dataset.transform, batch_size, rank, world_size)
        return DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=seed_worker)
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
                      worker_init_fn=seed_worker)
