"""An image folder checked once, up front, completely: every file's header read before training starts.

`screen_splits` checks every file of the path splits (in threads; a progress bar on a big tree when
the terminal shows one), caches each answer by path, size and mtime under the user's cache folder (a
re-run stats the files and reads nothing), and then either refuses the data listing every unreadable
file at once (`data.on_bad_image: error`) or leaves them out and returns them (`skip`).

What is read per file: PIL's header; `verify()` (PNG chunk CRCs, structure of the others); for a
JPEG without its end-of-image marker, a whole decode (that tells a truncated file from one with data
after the marker). A file that passes decodes in training; one that fails is named with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from orchestrator.data.decode import library_message
from orchestrator.data.splits import DataError, Split
from orchestrator.store.storage import write_atomic

CHECK_THREADS = 8
"""threads reading headers: the work is file I/O (a network filesystem's latency) more than CPU"""
PROGRESS_FROM_FILES = 2000
"""show a progress bar when at least this many files are not in the cache"""
LISTED_AT_MOST = 100
"""unreadable files named one per line in the error; the count says how many more"""


def image_problem(path: str) -> str | None:
    """Why the image file at `path` cannot be used for training, in words without library paths; None if it can."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            image_format = img.format
            img.verify()
        if image_format == "JPEG" and not _ends_with_jpeg_marker(path):
            with Image.open(path) as img:
                img.load()
    except UnidentifiedImageError:
        return "not an image (no image format PIL knows in its first bytes)"
    except Image.DecompressionBombError as exc:
        return f"too large to decode safely ({library_message(exc)})"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return f"damaged or truncated: {library_message(exc)}"
    return None


def _ends_with_jpeg_marker(path: str) -> bool:
    with open(path, "rb") as file:
        file.seek(max(0, os.path.getsize(path) - 2))
        return file.read(2) == b"\xff\xd9"


def cache_file(paths: list[str]) -> Path:
    """Where the answers for this set of files are kept: one JSON file per tree, under the user's cache folder."""
    root = os.path.commonpath(paths) if paths else ""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orchestrator" / "image-check"
    return base / f"{hashlib.sha256(root.encode()).hexdigest()[:16]}.json"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_images(paths: list[str]) -> dict[str, str]:
    """{path: reason} of the files that cannot be used; answers cached by (size, mtime_ns) per path."""
    where = cache_file(paths)
    cached = _read_cache(where)
    keys = {}
    for path in paths:
        stat = os.stat(path)
        keys[path] = [stat.st_size, stat.st_mtime_ns]
    todo = [p for p in paths if cached.get(p, [None, None])[:2] != keys[p]]
    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        answers = pool.map(image_problem, todo)
        if len(todo) >= PROGRESS_FROM_FILES:
            answers = _with_progress(answers, len(todo))
        for path, reason in zip(todo, answers):
            cached[path] = keys[path] + [reason]
    if todo:
        try:
            write_atomic(where, json.dumps(cached).encode())   # other subsets of the tree (data.classes) stay cached
        except OSError:
            pass   # a cache that cannot be written costs the next run a re-check, nothing else
    return {p: cached[p][2] for p in paths if cached[p][2] is not None}


def _with_progress(answers, total: int):
    from rich.console import Console
    from rich.progress import track

    yield from track(answers, total=total, description="checking images", console=Console(stderr=True),
                     transient=True)


def screen_splits(splits: dict[str, Split], on_bad_image: str, notes: list[str]) -> tuple[dict[str, Split], list[list[str]]]:
    """The splits with every file checked: DataError listing all unreadable files (on_bad_image 'error'),
    or the splits without them and [[path, reason], ...] of those left out ('skip'). Splits of arrays or
    bytes pass as they are."""
    paths = [path for split in splits.values() if split.kind == "path" for path in split.items]
    bad = check_images(paths)
    if not bad:
        return splits, []
    listed = [f"  {path}: {reason}" for path, reason in list(bad.items())[:LISTED_AT_MOST]]
    if on_bad_image == "error":
        more = [f"  ... and {len(bad) - LISTED_AT_MOST} more"] if len(bad) > LISTED_AT_MOST else []
        raise DataError("\n".join([f"data.source: {len(bad)} of {len(paths)} image files cannot be read "
                                   "(data.on_bad_image: skip leaves them out):"] + listed + more))
    kept = {}
    for name, split in splits.items():
        keep = [i for i, item in enumerate(split.items) if split.kind != "path" or item not in bad]
        kept[name] = split.subset(np.array(keep, dtype=np.int64))
    notes.append(f"left out {len(bad)} unreadable image file(s) of {len(paths)} (data.on_bad_image: skip); "
                 "the run folder's bad_images.txt lists them")
    return kept, [[path, reason] for path, reason in bad.items()]
