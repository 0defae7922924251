"""`data.source`: reading the configured source into train/val/test, and the steps every source shares.

`READERS` maps each `data.source` kind (their forms and what each allows: `catalog.SOURCES`) to
what reads it. `load_splits(data_spec, seed)` keeps `data.classes`, cuts a stratified `val_fraction`
when the source has no val split, and keeps `max_per_class` training images per class. A streamed
source (packed shards) makes its splits itself. Missing folders and empty sources raise `DataError`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from orchestrator.config.catalog import SOURCES, same_names
from orchestrator.config.spec import DataSpec
from orchestrator.data.image_check import screen_splits
from orchestrator.data.packed import load_packed
from orchestrator.data.readers import read_digits, read_imagefolder, read_parquet, read_synthetic
from orchestrator.data.splits import DataError, Split, Splits, cap_per_class, stratified_split

READERS: dict[str, Callable] = {
    "builtin": read_digits,
    "imagefolder": read_imagefolder,
    "parquet": read_parquet,
    "shards": load_packed,
    "synthetic": read_synthetic,
}
"""data.source kind -> (data spec, seed) -> (class names, splits by name, notes); a streamed kind
(catalog.SOURCES[kind].streams) -> (data spec, seed) -> Splits"""
same_names(READERS, SOURCES, "data.sources.READERS")


def _keep_classes(class_names: list[str], splits: dict[str, Split], keep: list[int | str]) -> tuple[list[str], dict[str, Split]]:
    """Keep the listed classes (indices or names), relabelled 0..K-1 in the listed order."""
    indices = []
    for cls in keep:
        if isinstance(cls, int) and 0 <= cls < len(class_names):
            indices.append(cls)
        elif str(cls) in class_names and not isinstance(cls, int):
            indices.append(class_names.index(str(cls)))
        else:
            raise DataError(f"data.classes: {cls!r} is not a class of this source; classes: {', '.join(class_names)}")
    remap = np.full(len(class_names), -1, dtype=np.int64)
    remap[indices] = np.arange(len(indices))
    out = {}
    for name, split in splits.items():
        kept = np.flatnonzero(remap[split.labels] >= 0)
        sub = split.subset(kept)
        sub.labels = remap[sub.labels]
        out[name] = sub
    return [class_names[i] for i in indices], out


def load_splits(data: DataSpec, seed: int) -> Splits:
    """Train/val/test of the configured source, after class selection, the check of every image file
    (data.on_bad_image), val split and few-shot cap."""
    read = READERS[data.source_kind]
    if SOURCES[data.source_kind].streams:
        return read(data, seed)
    class_names, splits, notes = read(data, seed)
    if data.classes is not None:
        class_names, splits = _keep_classes(class_names, splits, data.classes)
    splits, bad_images = screen_splits(splits, data.on_bad_image, notes)
    train = splits["train"]
    if "val" in splits:
        val = splits["val"]
    else:
        keep, held = stratified_split(train.labels, data.val_fraction, seed)
        train, val = train.subset(keep), train.subset(held)
        notes.append(f"no val split: held out {len(val)} of {len(keep) + len(held)} training images (val_fraction {data.val_fraction}, stratified, seed {seed})")
    if data.max_per_class is not None:
        before = len(train)
        train = train.subset(cap_per_class(train.labels, data.max_per_class, seed))
        notes.append(f"few-shot: kept {len(train)} of {before} training images (max_per_class {data.max_per_class})")
    test = splits.get("test")
    if test is None:
        notes.append(f"no test split in {data.source}: the summary reports validation accuracy only")
    if len(train) == 0:
        raise DataError(f"data: no training images left in {data.source} after class selection")
    for name, split in (("val", val), ("test", test)):
        absent = [] if split is None else sorted(set(range(len(class_names))) - set(split.labels.tolist()))
        if absent and len(split):
            notes.append(f"warning: the {name} split has no images of class(es) "
                         f"{', '.join(class_names[i] for i in absent[:10])}{' ...' if len(absent) > 10 else ''}: "
                         f"their {name} accuracy is not measured")
    if len(class_names) < 2:
        raise DataError(f"data.source: {data.source} has one class ({', '.join(class_names)}); a classifier needs at "
                        "least two (one class would reach 'accuracy 1.0' learning nothing)")
    return Splits(class_names, train, val, test, notes, bad_images)
