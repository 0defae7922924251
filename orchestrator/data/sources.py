"""Reading each data source into labelled splits, and the seeded ways of cutting them.

`SOURCES` is the registry of `data.source` kinds (the spec's validation reads it): each reads a
source into labelled `Split`s whose items are decoded lazily by `data.datasets`: uint8 arrays
(builtin digits, synthetic), encoded image bytes (Parquet) or file paths (image folders).
`load_splits(data_spec, seed)` applies the common steps every source shares: keep `data.classes`,
cut a stratified `val_fraction` when the source has no val split, keep `max_per_class` training
images per class. Missing folders and empty sources raise `DataError` naming the path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from orchestrator.spec import DataSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ItemKind = Literal["array", "bytes", "path"]


class DataError(Exception):
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


@dataclass
class Splits:
    class_names: list[str]
    train: Split
    val: Split
    test: Split | None
    notes: list[str] = field(default_factory=list)
    """what was derived or is missing, said once on screen ('no test split: ...')"""

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


def _digits(data: DataSpec, seed: int) -> tuple[list[str], dict[str, Split], list[str]]:
    import pyarrow.parquet as pq

    path = resources.files("orchestrator.data") / "digits.parquet"
    table = pq.read_table(str(path))
    pixels = np.frombuffer(b"".join(table.column("pixels").to_pylist()), dtype=np.uint8).reshape(-1, 8, 8)
    rgb = np.repeat(pixels[..., None], 3, axis=-1)
    labels = table.column("label").to_numpy().astype(np.int64)
    split = np.array(table.column("split").to_pylist())
    splits = {name: Split("array", rgb[split == name], labels[split == name]) for name in ("train", "test")}
    return [str(i) for i in range(10)], splits, []


GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
"""glyph classes, in label order: letters and digits that no rotation turns into one another (no I, O, 0, 1)"""


def draw_glyph(char: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: `char` at a random size (50-90% of the side), angle (+-25 degrees), place and
    colour (light on dark) over a random background with 2 thin clutter strokes, then gaussian pixel noise (sigma 12)."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = 2 * size                                    # drawn at 2x, then downsampled: antialiased edges
    background = tuple(int(v) for v in rng.integers(0, 110, 3))     # dark, any hue
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    for _ in range(2):
        points = [tuple(int(v) for v in rng.integers(0, canvas, 2)) for _ in range(2)]
        draw.line(points, fill=tuple(int(v) for v in rng.integers(40, 200, 3)), width=max(1, canvas // 32))
    colour = tuple(int(v) for v in rng.integers(150, 256, 3))       # light, any hue
    glyph = Image.new("L", (canvas, canvas), 0)
    font = ImageFont.load_default(size=int(canvas * rng.uniform(0.5, 0.9)))
    ImageDraw.Draw(glyph).text((canvas / 2, canvas / 2), char, fill=255, font=font, anchor="mm")
    glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR,
                         translate=tuple(float(v) for v in rng.uniform(-canvas / 8, canvas / 8, 2)))
    image.paste(Image.new("RGB", (canvas, canvas), colour), (0, 0), glyph)
    pixels = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32)
    return np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=6)
def _glyph_images(seed: int, split_index: int, count: int, num_classes: int, size: int) -> np.ndarray:
    """The images of one glyph split (cached: a benchmark trains many runs on the same data in one process)."""
    rng = np.random.default_rng([seed, split_index])
    return np.stack([draw_glyph(GLYPHS[label], size, rng) for label in np.arange(count) % num_classes])


def _glyph_split(seed: int, split_index: int, count: int, num_classes: int, size: int) -> Split:
    return Split("array", _glyph_images(seed, split_index, count, num_classes, size),
                 np.arange(count, dtype=np.int64) % num_classes)


def _synthetic(data: DataSpec, seed: int) -> tuple[list[str], dict[str, Split], list[str]]:
    """`patterns`: per-class random patterns plus noise (learnable, reproducible, any size); `glyphs`: a
    drawn character per class (`draw_glyph`), hard enough that a small model stays well under 100%."""
    syn, size = data.synthetic, data.image_size
    rng = np.random.default_rng(seed)
    if syn.kind == "glyphs":
        if syn.num_classes > len(GLYPHS):
            raise DataError(f"data.synthetic.num_classes: glyphs has {len(GLYPHS)} classes at most ({GLYPHS})")
        splits = {name: _glyph_split(seed, index, count, syn.num_classes, size)
                  for index, (name, count) in enumerate((("train", syn.train_samples), ("val", syn.val_samples),
                                                        ("test", syn.test_samples))) if count}
        return list(GLYPHS[:syn.num_classes]), splits, []
    patterns = rng.integers(0, 256, (syn.num_classes, size, size, 3), dtype=np.uint8)
    splits = {}
    for name, count in (("train", syn.train_samples), ("val", syn.val_samples), ("test", syn.test_samples)):
        if count == 0:
            continue
        labels = np.arange(count, dtype=np.int64) % syn.num_classes
        noise = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
        images = (patterns[labels].astype(np.uint16) + noise) // 2
        splits[name] = Split("array", images.astype(np.uint8), labels)
    return [str(i) for i in range(syn.num_classes)], splits, []


IGNORED_FOLDERS = ("__MACOSX",)
"""folders that archivers leave behind; never classes (nor are hidden, dot-named, folders)"""


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_FOLDERS


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _is_ignored(p.name))


def _image_files(class_dir: Path) -> list[Path]:
    """Image files under a class folder, hidden files (macOS `._x.jpg`) and ignored folders left out."""
    return sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(_is_ignored(part) for part in p.relative_to(class_dir).parts))


def _class_folder_split(folder: Path, class_names: list[str] | None, notes: list[str]) -> tuple[list[str], Split]:
    """The images under folder/<class>/; `class_names` None: the classes are the folders found here (train)."""
    names = class_names or _class_dirs(folder)
    if not names:
        raise DataError(f"data.source: {folder} holds no class folders (expected {folder}/<class>/<image>)")
    ignored = sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_ignored(p.name))
    if ignored:
        notes.append(f"ignored folders in {folder}: {', '.join(ignored)} (not classes)")
    paths, labels, empty = [], [], []
    for label, name in enumerate(names):
        files = _image_files(folder / name) if (folder / name).is_dir() else []
        if not files:
            empty.append(name)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"data.source: no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...) under {folder}")
    if empty and class_names is None:
        raise DataError(f"data.source: class folder(s) {', '.join(str(folder / n) for n in empty)} hold no images; "
                        "add images or remove the folder (an empty class would still get an output of the head)")
    return names, Split("path", paths, np.array(labels, dtype=np.int64))


def _imagefolder(data: DataSpec, seed: int) -> tuple[list[str], dict[str, Split], list[str]]:
    root = Path(data.source_path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.source: image folder {root} does not exist")
    notes = []
    train_dir = root / "train"
    if not train_dir.is_dir():
        train_dir = root
        notes.append(f"{root} has no train/ folder: its class folders are the training data")
    class_names, train = _class_folder_split(train_dir, None, notes)
    splits = {"train": train}
    for name in ("val", "test"):
        folder = root / name
        if folder.is_dir() and train_dir != root:
            extra = [c for c in _class_dirs(folder) if c not in class_names]
            if extra:
                raise DataError(f"data.source: {folder} has classes that train/ lacks: {', '.join(extra)}")
            splits[name] = _class_folder_split(folder, class_names, notes)[1]
    return class_names, splits, notes


def _parquet(data: DataSpec, seed: int) -> tuple[list[str], dict[str, Split], list[str]]:
    """Parquet with an `image` column (encoded bytes, or a struct with `bytes`), `label`, optional `split`."""
    import pyarrow.parquet as pq

    uri = data.source_path
    try:
        table = pq.read_table(uri)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"data.source: cannot read Parquet {uri}: {exc}") from None
    for column in ("image", "label"):
        if column not in table.column_names:
            raise DataError(f"data.source: Parquet {uri} has no {column!r} column (columns: {', '.join(table.column_names)})")
    images = table.column("image").to_pylist()
    images = [img["bytes"] if isinstance(img, dict) else img for img in images]
    raw_labels = table.column("label").to_pylist()
    names = sorted(set(raw_labels))
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index[label] for label in raw_labels], dtype=np.int64)
    split = np.array(table.column("split").to_pylist() if "split" in table.column_names else ["train"] * len(labels))
    splits = {}
    for name in ("train", "val", "test"):
        where = np.flatnonzero(split == name)
        if len(where):
            splits[name] = Split("bytes", [images[i] for i in where], labels[where])
    if "train" not in splits:
        raise DataError(f"data.source: Parquet {uri} has no rows with split 'train'")
    return [str(n) for n in names], splits, []


def _shards(data: DataSpec, seed: int) -> "Splits":
    """Packed shards: counted from the manifest, streamed by the loaders (nothing of the images read here)."""
    from orchestrator.data.shards import hold_out, read_manifest, split_of

    for key, value in (("data.classes", data.classes), ("data.max_per_class", data.max_per_class)):
        if value is not None:
            raise DataError(f"{key}: not available with packed shards (they stream); pack the classes or images you want")
    uri = data.source_path
    manifest = read_manifest(uri)
    notes = [f"packed shards {uri}: " + ", ".join(f"{name} {entry['images']}" for name, entry in manifest.splits.items())
             + f" images of {len(manifest.class_names)} classes"]
    if manifest.skipped:
        notes.append(f"warning: the pack skipped {len(manifest.skipped)} unreadable image(s); see {uri}/manifest.json")
    train, val, test = (split_of(manifest, uri, name) for name in ("train", "val", "test"))
    if train is None:
        raise DataError(f"data.source: {uri} has no training images")
    if val is None:
        train, val = hold_out(train, data.val_fraction, seed)
        notes.append(f"no val split: held out {len(val.units)} of {len(val.units) + len(train.units)} row groups "
                     f"({len(val)} images, val_fraction {data.val_fraction}, seed {seed})")
    if test is None:
        notes.append(f"no test split in {data.source}: the summary reports validation accuracy only")
    return Splits(manifest.class_names, train, val, test, notes)


@dataclass(frozen=True)
class Source:
    read: Callable[[DataSpec, int], tuple[list[str], dict[str, Split], list[str]]] | None
    """(data spec, seed) -> (class names, splits by name, notes)"""
    form: str
    """how a job file writes it"""
    takes_path: bool
    """the part after ':' is a local path or URI"""
    load: Callable[[DataSpec, int], "Splits"] | None = None
    """(data spec, seed) -> the splits, for a source that makes them itself (instead of `read`)"""


SOURCES = {
    "builtin": Source(_digits, "builtin:digits", takes_path=False),
    "imagefolder": Source(_imagefolder, "imagefolder:PATH", takes_path=True),
    "parquet": Source(_parquet, "parquet:PATH_OR_URI", takes_path=True),
    "shards": Source(None, "shards:PATH_OR_URI", takes_path=True, load=_shards),
    "synthetic": Source(_synthetic, "synthetic", takes_path=False),
}
"""data.source kinds (the part before ':'); the spec's validation reads this"""


def source_entry(source: str) -> Source | None:
    """The registry entry a data.source value names, or None when it names none."""
    kind, _, rest = source.partition(":")
    entry = SOURCES.get(kind)
    if entry is None or (rest == "" if entry.takes_path else source != entry.form):
        return None
    return entry


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
    """Train/val/test of the configured source, after class selection, val split and few-shot cap."""
    source = SOURCES[data.source_kind]
    if source.load is not None:
        return source.load(data, seed)
    class_names, splits, notes = source.read(data, seed)
    if data.classes is not None:
        class_names, splits = _keep_classes(class_names, splits, data.classes)
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
    return Splits(class_names, train, val, test, notes)
