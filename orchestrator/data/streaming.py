"""Torch datasets over packed shards (`shards.py` gives the order; this reads, decodes and batches it):
the streams of `packed.ShardSplit`.

`ShardTrainStream` yields this rank's micro-batches of an epoch, already collated, from however many
DataLoader workers read it; `ShardEvalStream` yields a rank's contiguous share of a split, every image once.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from orchestrator.data.decode import decode_image
from orchestrator.data.shards import (SHUFFLE_CHUNK_ROWS, UnitReader, chunk_permutation, pieces, rank_span, unit_order,
                                      worker_batches)
from orchestrator.data.splits import seed_base


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class ShardTrainStream(IterableDataset):
    """This rank's `num_batches` micro-batches of `batch_size` images an epoch (see shards.py for the order).

    `set_epoch(epoch, skip_batches)` before iterating: the first `skip_batches` of the rank's batches are
    skipped without decoding (a mid-epoch resume). `transform` None (data.decode: gpu): batches are
    (encoded uint8 tensors, labels, augmentation seeds), for `device_decode.DeviceDecoded`."""

    def __init__(self, split, transform, batch_size: int, num_batches: int, rank: int, world_size: int,
                 seed: int, mix=None):
        self.split, self.transform, self.batch_size, self.num_batches = split, transform, batch_size, num_batches
        self.rank, self.world_size, self.seed, self.mix = rank, world_size, seed, mix
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        """(epoch, batches to skip), in shared memory: loader workers that live for the whole run read the
        values `set_epoch` wrote at each new epoch's iteration"""
        start, stop = rank_span(len(split), world_size, rank)
        if num_batches * batch_size > stop - start:
            raise ValueError(f"{num_batches} batches of {batch_size} do not fit a rank's share of {len(split)} images")
        UnitReader(split).warm_up()

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self._position[0], self._position[1] = epoch, skip_batches

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @property
    def skip_batches(self) -> int:
        return int(self._position[1])

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        loader_worker, workers = _worker()
        epoch, skip_batches = self.epoch, self.skip_batches   # read once: set_epoch may write the next epoch's
        # a DataLoader asks its workers in turn from worker 0: after skipping s batches, the next one (s) is
        # owed by stretch s mod W, so loader worker i serves stretch (i + s) mod W
        worker = (loader_worker + skip_batches) % workers
        batch = self.batch_size
        span_start, mine = self._stretch(worker, workers)
        skip = worker_batches(skip_batches, workers, worker) * batch
        order = unit_order(len(self.split.units), self.seed, epoch)
        base = seed_base(self.seed, epoch, self.rank, worker, workers)
        reader = self._reader_here()
        chunks = [(chunk, chunk * SHUFFLE_CHUNK_ROWS, min(mine, (chunk + 1) * SHUFFLE_CHUNK_ROWS))
                  for chunk in range(math.ceil(mine / SHUFFLE_CHUNK_ROWS))]
        chunks = [(chunk, lo, hi) for chunk, lo, hi in chunks if hi > skip]

        def read(lo: int, hi: int):
            return reader.rows(pieces(self.split, order, span_start + lo, span_start + hi))

        images, labels, seeds = [], [], []
        # the next chunk is read in a thread while this one decodes (pyarrow reads without the GIL), so a
        # worker does not stall at a chunk's start for longer than its queued batches last; the last chunk's
        # successor is the next epoch's first, which a worker that lives for the run finds read already
        pool = self._pool_here()
        pending = self._first_read(pool, read, epoch, span_start, chunks[0][1:]) if chunks else None
        for index, (chunk, lo, hi) in enumerate(chunks):
            encoded, chunk_labels = pending.result()
            if index + 1 < len(chunks):
                pending = pool.submit(read, *chunks[index + 1][1:])
            else:   # a plain next epoch skips nothing: loader worker i serves stretch i
                self._read_ahead(pool, reader, epoch + 1, *self._stretch(loader_worker, workers))
            permutation = chunk_permutation(hi - lo, self.seed, epoch, self.rank, worker, chunk)
            for position in range(max(lo, skip), hi):
                row = int(permutation[position - lo])
                images.append(self._image(encoded[row], base + position))
                labels.append(int(chunk_labels[row]))
                seeds.append(base + position)
                if len(images) == batch:
                    yield (self._collate(images, labels) if self.transform is not None
                           else (images, torch.tensor(labels), seeds))
                    images, labels, seeds = [], [], []
            del encoded, chunk_labels

    def _stretch(self, worker: int, workers: int) -> tuple[int, int]:
        """(first row in the epoch's stream, rows) of the stretch that `worker` of `workers` owns."""
        batch = self.batch_size
        offset = sum(worker_batches(self.num_batches, workers, v) for v in range(worker)) * batch
        start = rank_span(len(self.split), self.world_size, self.rank)[0]
        return start + offset, worker_batches(self.num_batches, workers, worker) * batch

    def __getstate__(self) -> dict:
        """What a loader process gets: no thread, no read in flight (each process keeps its own)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_kept_pool", "_ahead")}

    def _pool_here(self) -> ThreadPoolExecutor:
        """This process's reading thread (one: reads are in order, and the reader is not shared between threads)."""
        if getattr(self, "_kept_pool", None) is None:
            self._kept_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-read")
        return self._kept_pool

    def _first_read(self, pool: ThreadPoolExecutor, read, epoch: int, span_start: int, rows: tuple[int, int]):
        """The epoch's first chunk: the read the previous epoch started ahead when it is this one (same
        epoch and rows: a plain next epoch, not a resume elsewhere), else a new read."""
        ahead, self._ahead = getattr(self, "_ahead", None), None
        if ahead is not None and ahead[0] == (epoch, span_start + rows[0], span_start + rows[1]):
            return ahead[1]
        return pool.submit(read, *rows)

    def _read_ahead(self, pool: ThreadPoolExecutor, reader: UnitReader, epoch: int, span_start: int, mine: int) -> None:
        """Start reading `epoch`'s first chunk of the stretch (span_start, mine rows) while this epoch's last decodes."""
        order, rows = unit_order(len(self.split.units), self.seed, epoch), min(mine, SHUFFLE_CHUNK_ROWS)
        future = pool.submit(lambda: reader.rows(pieces(self.split, order, span_start, span_start + rows)))
        self._ahead = ((epoch, span_start, span_start + rows), future)

    def _reader_here(self) -> UnitReader:
        """This process's reader, kept by a loader worker that lives for the run: its filesystem and last
        row group carry over from one epoch to the next."""
        if getattr(self, "_kept_reader", None) is None:
            self._kept_reader = UnitReader(self.split)
        return self._kept_reader

    def _image(self, blob, seed: int):
        """The decoded, augmented image (its augmentation drawn from `seed`); with no transform (data.decode:
        gpu) the encoded bytes as a uint8 tensor, for the device to decode."""
        if self.transform is None:
            return torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        torch.default_generator.manual_seed(seed)   # CPU only: torch.manual_seed also queues CUDA seeding, 1.4 ms a call
        return self.transform(decode_image(blob, f"{self.split.uri} ({self.split.name} split)", self.split.exif_transpose))

    def _collate(self, images: list, labels: list):
        from torch.utils.data import default_collate

        # default_collate stacks straight into shared memory in a loader worker (torch.stack then a copy there otherwise)
        stacked, targets = default_collate(images), torch.tensor(labels, dtype=torch.long)
        return self.mix(stacked, targets) if self.mix else (stacked, targets)


class ShardEvalStream(IterableDataset):
    """Rank `rank`'s contiguous share of a split in pack order, in batches; the ranks' shares sum to the split."""

    def __init__(self, split, transform, batch_size: int, rank: int, world_size: int):
        self.split, self.transform, self.batch_size, self.rank, self.world_size = split, transform, batch_size, rank, world_size

    def share(self) -> tuple[int, int]:
        total = len(self.split)
        return total * self.rank // self.world_size, total * (self.rank + 1) // self.world_size

    def __iter__(self):
        worker, workers = _worker()
        start, stop = self.share()
        lo, hi = start + (stop - start) * worker // workers, start + (stop - start) * (worker + 1) // workers
        order = np.arange(len(self.split.units))
        reader = UnitReader(self.split)
        for first in range(lo, hi, self.batch_size):
            encoded, labels = reader.rows(pieces(self.split, order, first, min(hi, first + self.batch_size)))
            images = [self.transform(decode_image(blob, f"{self.split.uri} ({self.split.name} split)",
                                                      self.split.exif_transpose)) for blob in encoded]
            yield torch.stack(images), torch.as_tensor(labels, dtype=torch.long)
