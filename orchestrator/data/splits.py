"""What every data source reads into: labelled splits, the errors of data, and the seeded ways of cutting them.

A `Split` is held in memory (decoded uint8 arrays, encoded bytes or file paths, decoded lazily by
`data.loaders`); a `StreamedSplit` is read from storage as the loaders go (packed shards): the
small interface a streamed source implements, which the loaders and Ray Data use. numpy only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from orchestrator.config.errors import JobError

ItemKind = Literal["array", "bytes", "path"]


class DataError(JobError):
    """Data that cannot be used; the message names the source, path or key."""


@dataclass
class Split:
    kind: ItemKind
    items: list | np.ndarray
    """uint8 (N, H, W, 3) array, list of encoded bytes, or list of file paths"""
    labels: np.ndarray
    """int64 (N,), 0..num_classes-1"""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Split":
        indices = np.asarray(indices, dtype=np.int64)
        items = self.items[indices] if isinstance(self.items, np.ndarray) else [self.items[i] for i in indices]
        return Split(self.kind, items, self.labels[indices])


class StreamedSplit(ABC):
    """A split read from storage in an order that is a pure function of (seed, epoch), never held in memory.

    The loaders (`data.loaders`) take its streams as they are; `parquet_files` is what Ray Data reads
    (`data.loader: ray_data`). A new streamed source implements these four and nothing else."""

    name: str
    """train, val or test"""

    @abstractmethod
    def __len__(self) -> int:
        """images in the split"""

    @abstractmethod
    def train_stream(self, transform, batch_size: int, num_batches: int, rank: int, world_size: int, seed: int,
                     mix=None):
        """A torch IterableDataset of this rank's `num_batches` micro-batches of `batch_size` images an epoch,
        already collated (and mixed by `mix`); `set_epoch(epoch, skip_batches)` before each epoch. The
        ranks' batches together are the plan's global batches; every image at most once an epoch."""

    @abstractmethod
    def eval_stream(self, transform, batch_size: int, rank: int, world_size: int):
        """A torch IterableDataset of rank `rank`'s share of the split in batches; the shares sum to the split."""

    @abstractmethod
    def parquet_files(self) -> list[str]:
        """Parquet files (columns `image`: encoded bytes, `label`) holding exactly this split, for Ray Data;
        DataError when the split is not whole files."""


@dataclass
class Splits:
    class_names: list[str]
    train: Split | StreamedSplit
    val: Split | StreamedSplit
    test: Split | StreamedSplit | None
    notes: list[str] = field(default_factory=list)
    """what was derived or is missing, said once on screen ('no test split: ...')"""
    bad_images: list[list[str]] = field(default_factory=list)
    """[[path, reason], ...] of the files left out as unreadable (data.on_bad_image: skip)"""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) indices: `fraction` of each class held out (at least 1 when it has 2+)."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        count = round(fraction * len(idx))
        if fraction > 0 and count == 0 and len(idx) >= 2:
            count = 1
        held.append(idx[:count])
        keep.append(idx[count:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def cap_per_class(labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """Sorted indices keeping at most max_per_class of each label (seeded choice)."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:max_per_class] for label in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def seed_base(seed: int, epoch: int, *stream: int) -> int:
    """Image `i` of a stream of an epoch is augmented with torch seed `seed_base(...) + i`: a function of
    where the image is, not of when it was drawn (so a resumed run draws what an unbroken one does)."""
    return int(np.random.SeedSequence([seed, epoch, *stream]).generate_state(1, dtype=np.uint64)[0] >> 2)
