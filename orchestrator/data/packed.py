"""`data.source: shards:URI` as splits: the pack's train/val/test (counted from its manifest, nothing of the
images read here), a val split held out by whole row groups when the pack has none, and `ShardSplit`,
the `StreamedSplit` whose streams `data.streaming` reads (see `data.shards` for the order of an epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from orchestrator.config.spec import DataSpec
from orchestrator.data.shards import Manifest, Unit, read_manifest
from orchestrator.data.splits import DataError, Splits, StreamedSplit


@dataclass
class ShardSplit(StreamedSplit):
    """One split of a packed dataset: where its row groups are; nothing of the images is in memory."""

    uri: str
    units: list[Unit]
    name: str
    held_out: bool = False
    """cut from the pack's train split by whole row groups (no val split packed): not whole files"""
    exif_transpose: bool = True
    """decode images upright by their EXIF orientation (data.exif_transpose)"""

    def __len__(self) -> int:
        return sum(u.rows for u in self.units)

    def train_stream(self, transform, batch_size: int, num_batches: int, rank: int, world_size: int, seed: int,
                     mix=None):
        from orchestrator.data.streaming import ShardTrainStream

        return ShardTrainStream(self, transform, batch_size, num_batches, rank, world_size, seed, mix)

    def eval_stream(self, transform, batch_size: int, rank: int, world_size: int):
        from orchestrator.data.streaming import ShardEvalStream

        return ShardEvalStream(self, transform, batch_size, rank, world_size)

    def parquet_files(self) -> list[str]:
        if self.held_out:
            raise DataError(f"data.loader: ray_data needs a pack with a val split ({self.uri} has none: pack a tree with val/)")
        return sorted({f"{self.uri}/{unit.file}" for unit in self.units})


def packed_split(manifest: Manifest, uri: str, name: str, exif_transpose: bool = True) -> ShardSplit | None:
    """The split `name` of a pack as the manifest lists it, or None when the pack has no images of it."""
    entry = manifest.splits.get(name)
    if not entry or not entry["images"]:
        return None
    units = [Unit(s["file"], i, rows) for s in entry["shards"] for i, rows in enumerate(s["row_groups"]) if rows]
    return ShardSplit(uri.rstrip("/"), units, name, exif_transpose=exif_transpose)


def hold_out(split: ShardSplit, fraction: float, seed: int) -> tuple[ShardSplit, ShardSplit]:
    """(train, val): whole row groups, a seeded `fraction` of them (pack shuffles images into row groups,
    so each row group is a random sample of the split)."""
    order = np.random.default_rng([seed, 7]).permutation(len(split.units))
    held_count = max(1, round(fraction * len(split.units)))
    if held_count >= len(split.units):
        raise DataError(f"data.source: {split.uri} has {len(split.units)} row group(s) and no val split: too few to hold "
                        "out val_fraction of them; pack with a val/ folder")
    held = set(order[:held_count].tolist())
    keep = [u for i, u in enumerate(split.units) if i not in held]
    held_units = [u for i, u in enumerate(split.units) if i in held]
    return (replace(split, units=keep, name="train", held_out=True),
            replace(split, units=held_units, name="val", held_out=True))


def load_packed(data: DataSpec, seed: int) -> Splits:
    """Packed shards: counted from the manifest, streamed by the loaders (nothing of the images read here)."""
    for key, value in (("data.classes", data.classes), ("data.max_per_class", data.max_per_class)):
        if value is not None:
            raise DataError(f"{key}: not available with packed shards (they stream); pack the classes or images you want")
    uri = data.source_path
    manifest = read_manifest(uri)
    notes = [f"packed shards {uri}: " + ", ".join(f"{name} {entry['images']}" for name, entry in manifest.splits.items())
             + f" images of {len(manifest.class_names)} classes"]
    if manifest.skipped:
        notes.append(f"warning: the pack skipped {len(manifest.skipped)} unreadable image(s); see {uri}/manifest.json")
    train, val, test = (packed_split(manifest, uri, name, data.exif_transpose) for name in ("train", "val", "test"))
    if train is None:
        raise DataError(f"data.source: {uri} has no training images")
    if val is None:
        train, val = hold_out(train, data.val_fraction, seed)
        notes.append(f"no val split: held out {len(val.units)} of {len(val.units) + len(train.units)} row groups "
                     f"({len(val)} images, val_fraction {data.val_fraction}, seed {seed})")
    if test is None:
        notes.append(f"no test split in {data.source}: the summary reports validation accuracy only")
    return Splits(manifest.class_names, train, val, test, notes)
