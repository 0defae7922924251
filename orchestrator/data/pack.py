"""`orchestrator pack SRC OUT`: an ImageFolder tree becomes Parquet shards plus a manifest (see data/shards.py).

SRC holds train/ (and val/, test/) with one folder per class, or the class folders themselves: those
are split as training splits such a folder, a stratified `val_fraction` of each class (seed PACK_SEED)
packed as val. Each split's images are shuffled once (seed PACK_SEED, so row groups are random
samples of the split) and cut into shards of about --shard-size-mb by file size; row groups of about
ROW_GROUP_MB. Images keep their encoded bytes unless --max-side asks for a re-encode of larger ones
(JPEG, quality JPEG_QUALITY). Every image is decoded once on the way: one that does not decode is
listed in the manifest's `skipped` and on screen, never silently dropped. Shards are packed in
parallel processes; a shard already in OUT with the same planned contents (a digest in its metadata)
is kept, so a re-run after an interruption packs only what is missing. The manifest is written last:
a pack that did not finish has none, and `shards:` refuses the folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.config.errors import UserError
from orchestrator.data.decode import library_message, rgb_image
from orchestrator.data.readers import class_dirs, image_files
from orchestrator.data.shards import (MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, PACK_SPLITS, open_fs,
                                      storage_message)
from orchestrator.data.splits import stratified_split

PACK_SEED = 0
ROW_GROUP_MB = 32
JPEG_QUALITY = 90
SHARD_META_KEY = b"orchestrator.shard"


class PackError(UserError):
    """SRC or OUT cannot be used; one line naming it (exit 2)."""


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    files: list[tuple[str, int]]
    """(absolute path, label)"""
    root: str
    """SRC, for the relative paths written with each row"""

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}.parquet"

    def digest(self, max_side: int | None) -> str:
        text = json.dumps([self.files, max_side, MANIFEST_VERSION])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def scan(src: Path, val_fraction: float = 0.2) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(class names, {split: [(path, label)]}) of an ImageFolder tree, a val split held out of a flat one
    (class folders at the top); PackError (one line) when SRC is no such tree or cannot be listed."""
    if not src.is_dir():
        raise PackError(f"SRC: {src} is not a folder")
    try:
        return _scan(src, val_fraction)
    except OSError as exc:
        raise PackError(f"SRC: cannot list {exc.filename or src}: {exc.strerror or exc}") from None


def _scan(src: Path, val_fraction: float) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    nested = (src / "train").is_dir()
    base = src / "train" if nested else src
    class_names = class_dirs(base)
    if len(class_names) < 2:
        raise PackError(f"SRC: {base} has {len(class_names)} class folder(s); a classifier needs at least two")
    splits = {}
    for split in PACK_SPLITS if nested else ("train",):
        folder = src / split if nested else src
        if split != "train" and not folder.is_dir():
            continue
        extra = [c for c in class_dirs(folder) if c not in class_names]
        if extra:
            raise PackError(f"SRC: {folder} has classes that {base} lacks: {', '.join(extra[:10])}")
        splits[split] = [(str(path), label) for label, name in enumerate(class_names) if (folder / name).is_dir()
                         for path in image_files(folder / name)]
    if not nested and val_fraction > 0:
        train = splits["train"]
        keep, held = stratified_split(np.array([label for _, label in train]), val_fraction, PACK_SEED)
        splits["train"], splits["val"] = [train[i] for i in keep], [train[i] for i in held]
    return class_names, splits


def plan_shards(splits: dict[str, list[tuple[str, int]]], shard_bytes: int, root: str) -> list[ShardTask]:
    """Each split shuffled (PACK_SEED) and cut into shards of about `shard_bytes` by file size."""
    tasks = []
    for split, files in splits.items():
        order = np.random.default_rng([PACK_SEED, PACK_SPLITS.index(split)]).permutation(len(files))
        shards, current, size = [], [], 0
        for i in order:
            current.append(files[i])
            size += os.path.getsize(files[i][0])
            if size >= shard_bytes:
                shards.append(current)
                current, size = [], 0
        if current:
            shards.append(current)
        tasks += [ShardTask(split, index, shard, root) for index, shard in enumerate(shards)]
    return tasks


def encode_row(path: str, max_side: int | None) -> bytes:
    """The image's bytes as stored: the file's own, or re-encoded JPEG when its longer side exceeds max_side.
    Decodes it either way (so an unreadable image is found here, not in training); raises what PIL raises."""
    from PIL import Image

    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if max_side is None or max(image.size) <= max_side:
            return data
        image = rgb_image(image)   # upright and 8-bit before the EXIF and the bit depth are lost
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue()


def pack_shard(task: ShardTask, out: str, max_side: int | None, row_group_mb: float = ROW_GROUP_MB) -> dict:
    """Write one shard (unless an identical one is there); returns its manifest entry plus its skipped images."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, root = open_fs(out)
    target, digest = f"{root}/{task.name}", task.digest(max_side)
    existing = _existing_entry(fs, target, digest)
    if existing is not None:
        return {**existing, "reused": True}
    schema = pa.schema([("image", pa.binary()), ("label", pa.int32()), ("path", pa.string())])
    skipped, row_groups, per_class = [], [], {}
    rows: dict[str, list] = {"image": [], "label": [], "path": []}
    group_bytes = 0
    temp = f"{target}.tmp-{uuid.uuid4().hex[:8]}" if isinstance(fs, pafs.LocalFileSystem) else target
    with pq.ParquetWriter(temp, schema, filesystem=fs, compression={"image": "NONE", "label": "ZSTD", "path": "ZSTD"},
                          use_dictionary=["path"]) as writer:
        for path, label in task.files:
            try:
                blob = encode_row(path, max_side)
            except Exception as exc:   # PIL raises many types for a damaged file; each is a skipped image
                skipped.append({"path": path, "error": _image_error(exc)})
                continue
            rows["image"].append(blob)
            rows["label"].append(label)
            rows["path"].append(os.path.relpath(path, task.root))
            per_class[label] = per_class.get(label, 0) + 1
            group_bytes += len(blob)
            if group_bytes >= row_group_mb * 2**20:
                row_groups.append(_write_group(writer, schema, rows))
                group_bytes = 0
        if rows["image"]:
            row_groups.append(_write_group(writer, schema, rows))
        entry = {"file": task.name, "split": task.split, "rows": sum(row_groups), "row_groups": row_groups,
                 "per_class": {str(k): v for k, v in sorted(per_class.items())}, "skipped": skipped, "digest": digest}
        writer.add_key_value_metadata({SHARD_META_KEY: json.dumps(entry).encode()})
    if temp != target:
        fs.move(temp, target)
    return {**entry, "reused": False}


def _image_error(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL reads"
    return library_message(exc)


def _write_group(writer, schema, rows: dict[str, list]) -> int:
    import pyarrow as pa

    count = len(rows["image"])
    writer.write_table(pa.table({k: rows[k] for k in rows}, schema=schema), row_group_size=count)
    for column in rows.values():
        column.clear()
    return count


def _existing_entry(fs, target: str, digest: str) -> dict | None:
    """The entry stored in a finished shard with the same digest, else None (missing, other contents, unreadable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(target) as handle:
            metadata = pq.ParquetFile(handle).metadata.metadata or {}
        entry = json.loads(metadata[SHARD_META_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None
    return entry if entry.get("digest") == digest else None


def pack(src: str, out: str, shard_size_mb: float = 256, max_side: int | None = None, workers: int | None = None,
         on_shard=None, row_group_mb: float = ROW_GROUP_MB, val_fraction: float = 0.2) -> dict:
    """Pack SRC into OUT; returns the manifest. `on_shard(entry, images_total)` is called as each shard ends."""
    import pyarrow as pa

    source = Path(src).expanduser().resolve()
    class_names, splits = scan(source, val_fraction)
    tasks = plan_shards(splits, int(shard_size_mb * 2**20), str(source))
    try:
        fs, root = open_fs(out)
        fs.create_dir(root, recursive=True)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise PackError(f"OUT: cannot write {out}: {storage_message(exc)}") from None
    total = sum(len(t.files) for t in tasks)
    entries = []
    with ProcessPoolExecutor(max_workers=max(1, workers or os.cpu_count() or 1)) as pool:
        futures = [pool.submit(pack_shard, task, out, max_side, row_group_mb) for task in tasks]
        for future in as_completed(futures):
            try:
                entry = future.result()
            except (OSError, pa.ArrowException) as exc:
                raise PackError(f"OUT: cannot write a shard to {out}: {storage_message(exc)}") from None
            entries.append(entry)
            if on_shard:
                on_shard(entry, total)
    manifest = build_manifest(class_names, entries, max_side)
    try:
        with fs.open_output_stream(f"{root}/{MANIFEST_FILE}") as stream:
            stream.write(json.dumps(manifest, indent=1).encode())
    except (OSError, pa.ArrowException) as exc:
        raise PackError(f"OUT: cannot write {out}/{MANIFEST_FILE}: {storage_message(exc)}") from None
    return manifest


def build_manifest(class_names: list[str], entries: list[dict], max_side: int | None) -> dict:
    splits = {}
    for split in PACK_SPLITS:
        mine = sorted((e for e in entries if e["split"] == split), key=lambda e: e["file"])
        if not mine:
            continue
        per_class = [sum(e["per_class"].get(str(label), 0) for e in mine) for label in range(len(class_names))]
        splits[split] = {"images": sum(e["rows"] for e in mine), "per_class": per_class,
                         "shards": [{"file": e["file"], "rows": e["rows"], "row_groups": e["row_groups"]} for e in mine]}
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "class_names": class_names, "splits": splits,
            "max_side": max_side, "skipped": [s for e in entries for s in e["skipped"]]}


def check_out(out: str) -> None:
    """PackError when OUT names a file (not a folder) on a local disk."""
    if "://" not in out and Path(out).expanduser().is_file():
        raise PackError(f"OUT: {out} is a file; pack writes a folder")

