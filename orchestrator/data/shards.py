"""`data.source: shards:URI`: Parquet shards written by `orchestrator pack`, streamed to every rank.

Layout (the pack's contract): `<URI>/manifest.json` plus `<split>-NNNNN.parquet` files with columns
`image` (encoded bytes), `label` (int32, index into the manifest's class names) and `path` (where
the image came from). The manifest lists every shard with its row count and its row groups' row
counts, so planning counts images without opening a shard.

Order of an epoch (pure functions of seed and epoch, the same on every rank):
1. the split's row groups ("units") are permuted by (seed, epoch);
2. the rows they hold, in that order, are cut into one contiguous span per rank (floor(N / world)
   rows each, the rest unused this epoch): a rank reads only the row groups its span touches;
3. a rank's batches are dealt round-robin to its loader workers (batch k to worker k mod W, which
   is the order a DataLoader gathers them in), so each worker owns a contiguous stretch of the
   span: exactly the rows of its batches;
4. a worker shuffles its stretch in chunks of SHUFFLE_CHUNK_ROWS rows (its shuffle buffer),
   seeded by (seed, epoch, rank, worker, chunk), and cuts batches in that order.
Every optimizer step so sees exactly the plan's global batch, each image at most once an epoch,
and a resume at step s skips the first s steps' rows without decoding them. Augmentation draws
are seeded per image from its position (`splits.seed_base`), so they do not depend on where a run resumed.
Memory per worker: two shuffle chunks of encoded bytes (the one decoding, the next being read) and the row
groups they span, whatever the dataset size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from orchestrator.data.splits import DataError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "orchestrator-shards"
MANIFEST_VERSION = 1
SHUFFLE_CHUNK_ROWS = 1024
"""rows a loader worker shuffles together (and holds, encoded, at once)"""
PACK_SPLITS = ("train", "val", "test")
"""the splits a pack may hold, in the order pack writes them"""


def open_fs(uri: str):
    """(pyarrow filesystem, path inside it) for a local path, file://, s3:// or gs:// URI."""
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    from pathlib import Path

    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def storage_message(exc: BaseException) -> str:
    """One line for a pyarrow / OS error; refused credentials are said as such."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    lowered = text.lower()
    if any(word in lowered for word in ("access denied", "accessdenied", "access_denied", "forbidden", "invalidaccesskeyid",
                                        "signaturedoesnotmatch", "credentials", "403")):
        return f"the store refused the credentials ({text[:300]})"
    return text[:300]


@dataclass(frozen=True)
class Unit:
    """One row group of one shard: the unit a rank reads."""

    file: str
    """shard file name inside the shards folder"""
    row_group: int
    rows: int


@dataclass
class Manifest:
    class_names: list[str]
    splits: dict[str, dict]
    """split -> {"images": int, "per_class": [int], "shards": [{"file", "rows", "row_groups": [int]}]}"""
    skipped: list[dict]


def read_manifest(uri: str) -> Manifest:
    """The manifest at `<uri>/manifest.json`, checked against the shard files present; DataError naming
    what is missing or does not add up (a pack that did not finish has no manifest)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    where = f"{uri.rstrip('/')}/{MANIFEST_FILE}"
    try:
        fs, root = open_fs(uri)
        info = fs.get_file_info(f"{root}/{MANIFEST_FILE}")
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"data.source: no {MANIFEST_FILE} in {uri} (not a packed dataset, or its pack did not "
                            f"finish: run orchestrator pack SRC {uri} again)")
        with fs.open_input_stream(f"{root}/{MANIFEST_FILE}") as stream:
            raw = json.loads(stream.read().decode())
        present = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.File}
    except DataError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise DataError(f"data.source: cannot read {where}: {storage_message(exc)}") from None
    problems = _manifest_problems(raw, present)
    if problems:
        raise DataError(f"data.source: {where} is partial or not a manifest of orchestrator pack: {'; '.join(problems[:3])}")
    return Manifest(list(raw["class_names"]), raw["splits"], list(raw.get("skipped", [])))


def _manifest_problems(raw, present: set[str]) -> list[str]:
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        return [f"format is not {MANIFEST_FORMAT!r}"]
    if raw.get("version") != MANIFEST_VERSION:
        return [f"version {raw.get('version')!r}, this tool reads {MANIFEST_VERSION}"]
    problems = []
    names, splits = raw.get("class_names"), raw.get("splits")
    if not isinstance(names, list) or len(names) < 2:
        problems.append("class_names must list at least two classes")
    if not isinstance(splits, dict) or "train" not in splits:
        return problems + ["no train split"]
    for split, entry in splits.items():
        shards = entry.get("shards", []) if isinstance(entry, dict) else []
        rows = 0
        for shard in shards:
            if shard.get("file") not in present:
                problems.append(f"shard {shard.get('file')} of split {split} is missing")
            elif sum(shard.get("row_groups", [])) != shard.get("rows"):
                problems.append(f"shard {shard.get('file')}: row groups do not add up to its rows")
            rows += int(shard.get("rows", 0))
        if not isinstance(entry, dict) or rows != entry.get("images"):
            problems.append(f"split {split}: shards hold {rows} images, the manifest says {entry.get('images') if isinstance(entry, dict) else '?'}")
    return problems


# -- the order of an epoch: pure functions -------------------------------------------------------------------

def unit_order(num_units: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of row groups."""
    return np.random.default_rng([seed, epoch, 1]).permutation(num_units)


def rank_span(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of this rank's rows in the epoch's row stream."""
    per_rank = num_rows // world_size
    return rank * per_rank, (rank + 1) * per_rank


def worker_batches(num_batches: int, num_workers: int, worker: int) -> int:
    """How many of a rank's `num_batches` batches worker `worker` delivers (batch k goes to k mod W)."""
    return len(range(worker, num_batches, num_workers))


def pieces(split, order: np.ndarray, start: int, stop: int) -> list[tuple[int, int, int]]:
    """(unit index, first row, end row) covering rows [start, stop) of the stream `order` makes."""
    rows = np.array([split.units[i].rows for i in order], dtype=np.int64)
    ends = np.cumsum(rows)
    out = []
    first = int(np.searchsorted(ends, start, side="right"))
    for position in range(first, len(order)):
        unit_start = int(ends[position] - rows[position])
        if unit_start >= stop:
            break
        out.append((int(order[position]), max(start, unit_start) - unit_start, min(stop, int(ends[position])) - unit_start))
    return out


def chunk_permutation(size: int, seed: int, epoch: int, rank: int, worker: int, chunk: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, rank, worker, chunk, 2]).permutation(size)


# -- reading ------------------------------------------------------------------------------------------------

class UnitReader:
    """Reads row groups of one split's shards, keeping the last one (consecutive reads often share it)."""

    def __init__(self, split):
        self.split = split
        self.fs = None
        self.cached: tuple[int, tuple[list, np.ndarray]] | None = None

    def read(self, unit_index: int) -> tuple[list, np.ndarray]:
        """(encoded images, labels) of one row group; DataError naming the shard when it cannot be read."""
        if self.cached and self.cached[0] == unit_index:
            return self.cached[1]
        unit = self.split.units[unit_index]
        table = self._row_group(unit, ["image", "label"])
        if table.num_rows != unit.rows:
            raise DataError(f"data.source: shard {self.split.uri}/{unit.file} (row group {unit.row_group}) has "
                            f"{table.num_rows} rows, the manifest says {unit.rows}")
        # to_pylist, not to_numpy: ChunkedArray.to_numpy imports pandas (0.3 s in every new loader worker)
        value = (table.column("image").to_pylist(), np.array(table.column("label").to_pylist(), dtype=np.int64))
        self.cached = (unit_index, value)
        return value

    def warm_up(self) -> None:
        """Read one row group's labels: pyarrow's reader and codecs start once here, in the trainer, instead
        of in every loader worker it forks (0.1-0.5 s each, every epoch)."""
        self._row_group(self.split.units[0], ["label"]).column("label").to_pylist()

    def _row_group(self, unit: Unit, columns: list[str]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if self.fs is None:
                self.fs, self.root = open_fs(self.split.uri)
            with self.fs.open_input_file(f"{self.root}/{unit.file}") as handle:
                return pq.ParquetFile(handle).read_row_group(unit.row_group, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"data.source: cannot read shard {self.split.uri}/{unit.file} (row group {unit.row_group}): "
                            f"{storage_message(exc)}") from None

    def rows(self, parts: list[tuple[int, int, int]]) -> tuple[list, np.ndarray]:
        images, labels = [], []
        for unit_index, lo, hi in parts:
            unit_images, unit_labels = self.read(unit_index)
            images.extend(unit_images[lo:hi])
            labels.append(unit_labels[lo:hi])
        return images, np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
