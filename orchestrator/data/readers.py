"""The sources held in memory: the builtin digits, generated images, image folders and Parquet files.

Each reader takes (data spec, seed) and returns (class names, splits by name, notes); `data.sources`
applies the steps every source shares. Missing folders and empty sources raise `DataError` naming the path.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy as np

from orchestrator.config.spec import DataSpec
from orchestrator.data.splits import DataError, Split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def read_digits(data: DataSpec, seed: int) -> tuple[list[str], dict[str, Split], list[str]]:
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


def draw_glyph(char: str, size: int, rng: np.random.Generator, noise_std: float = 12.0, strokes: int = 2) -> np.ndarray:
    """(size, size, 3) uint8: `char` at a random size (50-90% of the side), angle (+-25 degrees), place and
    colour (light on dark) over a random background with `strokes` thin clutter lines, then gaussian pixel
    noise of `noise_std` (0-255 units)."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = 2 * size                                    # drawn at 2x, then downsampled: antialiased edges
    background = tuple(int(v) for v in rng.integers(0, 110, 3))     # dark, any hue
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    for _ in range(strokes):
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
    return np.clip(pixels + rng.normal(0, noise_std, pixels.shape), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=6)
def _glyph_images(seed: int, split_index: int, count: int, size: int, style: tuple[int, float, int]) -> np.ndarray:
    """The images of one glyph split, style (classes, noise_std, clutter strokes); cached: a benchmark trains
    many runs on the same data in one process."""
    num_classes, noise_std, strokes = style
    rng = np.random.default_rng([seed, split_index])
    return np.stack([draw_glyph(GLYPHS[label], size, rng, noise_std, strokes) for label in np.arange(count) % num_classes])


def _glyph_split(seed: int, split_index: int, count: int, size: int, syn) -> Split:
    style = (syn.num_classes, syn.noise_std, syn.clutter_strokes)
    return Split("array", _glyph_images(seed, split_index, count, size, style), np.arange(count, dtype=np.int64) % syn.num_classes)


def read_synthetic(data: DataSpec, seed: int) -> tuple[list[str], dict[str, Split], list[str]]:
    """`patterns`: per-class random patterns plus noise (learnable, reproducible, any size); `glyphs`: a
    drawn character per class (`draw_glyph`), hard enough that a small model stays well under 100%."""
    syn, size = data.synthetic, data.image_size
    rng = np.random.default_rng(seed)
    if syn.kind == "glyphs":
        if syn.num_classes > len(GLYPHS):
            raise DataError(f"data.synthetic.num_classes: glyphs has {len(GLYPHS)} classes at most ({GLYPHS})")
        splits = {name: _glyph_split(seed, index, count, size, syn)
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


def class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _is_ignored(p.name))


def image_files(class_dir: Path) -> list[Path]:
    """Image files under a class folder, hidden files (macOS `._x.jpg`) and ignored folders left out."""
    return sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(_is_ignored(part) for part in p.relative_to(class_dir).parts))


def _class_folder_split(folder: Path, class_names: list[str] | None, notes: list[str]) -> tuple[list[str], Split]:
    """The images under folder/<class>/; `class_names` None: the classes are the folders found here (train)."""
    names = class_names or class_dirs(folder)
    if not names:
        raise DataError(f"data.source: {folder} holds no class folders (expected {folder}/<class>/<image>)")
    ignored = sorted(p.name for p in folder.iterdir() if p.is_dir() and _is_ignored(p.name))
    if ignored:
        notes.append(f"ignored folders in {folder}: {', '.join(ignored)} (not classes)")
    paths, labels, empty = [], [], []
    for label, name in enumerate(names):
        files = image_files(folder / name) if (folder / name).is_dir() else []
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


def read_imagefolder(data: DataSpec, seed: int) -> tuple[list[str], dict[str, Split], list[str]]:
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
            extra = [c for c in class_dirs(folder) if c not in class_names]
            if extra:
                raise DataError(f"data.source: {folder} has classes that train/ lacks: {', '.join(extra)}")
            splits[name] = _class_folder_split(folder, class_names, notes)[1]
    return class_names, splits, notes


def read_parquet(data: DataSpec, seed: int) -> tuple[list[str], dict[str, Split], list[str]]:
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
