"""The run folder `<run.storage>/<name>/` on any filesystem pyarrow opens (local, file://, s3://, gs://).

Writes are atomic where the filesystem allows it (write a temp file, then rename; object stores
replace whole objects anyway). Owns the layout: `spec.yaml`, `plan.json`, `metrics.parquet`,
`summary.json`, `model.safetensors`, `checkpoint_epoch_NNNN/checkpoint.pt` (the latest
`run.keep_checkpoints`), `checkpoint_best/checkpoint.pt` (and `checkpoint_best_epoch_NNNN/` for the
`run.keep_best` best), `checkpoint_step/checkpoint.pt` (mid-epoch), `workers.json` (where each rank ran) and
`ray.log` (Ray's own log lines), `run.lock`, `tensorboard/` (event files), and what later commands
write: `report/` (report, evaluate) and `export/`. A sweep's folder holds `sweep.json`,
`results.parquet`, `best.yaml` and `trials/<trial id>/` (each a run folder, `trials_storage`). Every
module names these files through the constants here. `with_absolute_paths` makes a job's local paths
absolute for workers whose working directory is not the user's.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.config.catalog import SOURCES
from orchestrator.config.errors import UserError

if TYPE_CHECKING:   # pydantic is not needed to list runs or write a file
    from orchestrator.config.spec import JobSpec

SPEC_FILE = "spec.yaml"
PLAN_FILE = "plan.json"
METRICS_FILE = "metrics.parquet"
SUMMARY_FILE = "summary.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_DIR = "checkpoint_best"
BEST_CHECKPOINT = f"{BEST_DIR}/{CHECKPOINT_FILE}"
STEP_DIR = "checkpoint_step"
STEP_CHECKPOINT = f"{STEP_DIR}/{CHECKPOINT_FILE}"
"""the latest mid-epoch checkpoint (run.checkpoint_every_steps); removed once an epoch checkpoint supersedes it"""
WORKERS_FILE = "workers.json"
BAD_IMAGES_FILE = "bad_images.txt"
"""the image files left out as unreadable (data.on_bad_image: skip), `path<TAB>reason` per line"""
RAY_LOG_FILE = "ray.log"
LOCK_FILE = "run.lock"
TENSORBOARD_DIR = "tensorboard"
REPORT_DIR = "report"
EXPORT_DIR = "export"
SWEEP_STATE_FILE = "sweep.json"
SWEEP_RESULTS_FILE = "results.parquet"
SWEEP_BEST_FILE = "best.yaml"
SWEEP_TRIALS_DIR = "trials"
MEASURES_FILE = "measures.json"
"""a sweep trial's measured objectives (params, latency_ms), written once"""
EPOCH_DIR_PATTERN = re.compile(r"^checkpoint_epoch_(\d+)$")
BEST_EPOCH_DIR_PATTERN = re.compile(r"^checkpoint_best_epoch_(\d+)$")
"""run.keep_best K > 1: the K best epochs' checkpoints, checkpoint_best_epoch_NNNN/checkpoint.pt"""
TEMP_PATTERN = re.compile(r"\.tmp-[0-9a-f]{8}$")
"""temporary files of an atomic write (`<name>.tmp-<8 hex>`); left only by a write that died"""


class StorageError(Exception):
    """The run folder cannot be written or read (full disk, no permission, not a folder, network).

    The message is one line naming the path and the cause.
    """


class RunFolderUnusable(StorageError, UserError):
    """The run folder cannot even be created or locked: a problem of the job's run.storage (exit 2)."""


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def finite_or_none(value):
    """`value` with every NaN or infinite float replaced by None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value, indent: int | None = 2) -> str:
    """Strict JSON (RFC 8259): non-finite floats become null, never a bare NaN."""
    return json.dumps(finite_or_none(value), indent=indent, default=str, allow_nan=False)


def epoch_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}"


def trials_storage(sweep_uri: str) -> str:
    """The run.storage of a sweep's trials: each trial is the run folder `<sweep>/trials/<trial id>/`."""
    return f"{sweep_uri}/{SWEEP_TRIALS_DIR}"


def absolute_storage(storage: str) -> str:
    """A URI stays as it is; a local path becomes absolute (Ray requires it)."""
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def with_absolute_paths(spec: JobSpec) -> JobSpec:
    """A copy whose local paths (run.storage, a local data source, model.weights files and run
    folders) are absolute, so Ray workers, whose working directory is not the user's, find them."""
    data = spec.data
    source = data.source
    if SOURCES[data.source_kind].takes_path:
        source = f"{data.source_kind}:{absolute_storage(data.source_path)}"
    weights = spec.model.weights
    if weights is not None and (Path(weights).expanduser().exists() or weights.startswith((".", "/", "~"))
                                or Path(weights).suffix in (".pth", ".pt", ".safetensors")):
        weights = absolute_storage(weights)
    return spec.model_copy(update={
        "data": data.model_copy(update={"source": source}),
        "model": spec.model.model_copy(update={"weights": weights}),
        "run": spec.run.model_copy(update={"storage": absolute_storage(spec.run.storage)}),
    })


@dataclass
class RunFolder:
    """`<storage>/<name>/` on its filesystem; paths passed to methods are relative to it."""

    storage: str
    name: str

    def __post_init__(self):
        self.storage = absolute_storage(self.storage)
        self.fs, base = pafs.FileSystem.from_uri(self.storage) if "://" in self.storage else (pafs.LocalFileSystem(), self.storage)
        self.root = f"{base.rstrip('/')}/{self.name}"

    @property
    def uri(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, relative: str = "") -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write through a temp file then a rename; on failure the temp file is removed and StorageError
        names the path and the cause (the previous version of the file, if any, is untouched)."""
        target = self.path(relative)
        temp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(temp) as out:
                out.write(data)
            self.fs.move(temp, target)
        except (OSError, pa.ArrowException) as exc:
            self._remove_quietly(temp)
            raise StorageError(f"cannot write {self.uri}/{relative}: {_cause(exc)}") from None

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except (OSError, pa.ArrowException):
            pass

    def sweep_temp_files(self) -> list[str]:
        """Delete the temp files that writes which died left behind; returns their relative paths."""
        if not self.exists(""):
            return []
        found = [info.path for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
                 if info.type == pafs.FileType.File and TEMP_PATTERN.search(info.base_name)]
        for path in found:
            self._remove_quietly(path)
        return [path[len(self.root) + 1:] for path in found]

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def write_json(self, relative: str, value) -> None:
        self.write_bytes(relative, (strict_json(value) + "\n").encode())

    def read_json(self, relative: str):
        return json.loads(self.read_bytes(relative))

    def write_text(self, relative: str, text: str) -> None:
        self.write_bytes(relative, text.encode())

    def write_rows(self, relative: str, rows: list[dict]) -> None:
        """Rows as a Parquet file (the whole file is rewritten: rows are few, one per epoch)."""
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        self.write_bytes(relative, buffer.getvalue())

    def read_rows(self, relative: str) -> list[dict]:
        return pq.read_table(pa.BufferReader(self.read_bytes(relative))).to_pylist()

    def epoch_checkpoints(self) -> list[tuple[int, str]]:
        """(epoch, relative file path) of every epoch checkpoint present, oldest first."""
        if not self.exists(""):
            return []
        found = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False)):
            match = EPOCH_DIR_PATTERN.match(info.base_name)
            if match and info.type == pafs.FileType.Directory and self.exists(f"{info.base_name}/{CHECKPOINT_FILE}"):
                found.append((int(match.group(1)), f"{info.base_name}/{CHECKPOINT_FILE}"))
        return sorted(found)

    def latest_checkpoint(self) -> str | None:
        found = self.epoch_checkpoints()
        return found[-1][1] if found else None

    def best_or_latest_checkpoint(self) -> str | None:
        """The best checkpoint, else the latest epoch checkpoint, else None (relative paths)."""
        return BEST_CHECKPOINT if self.exists(BEST_CHECKPOINT) else self.latest_checkpoint()

    def delete_dir(self, relative: str) -> None:
        self.fs.delete_dir(self.path(relative))

    def write_epoch_checkpoint(self, epoch: int, data: bytes, keep: int) -> None:
        """Write an epoch's checkpoint and delete all but the latest `keep` (as Ray's CheckpointConfig does)."""
        self.write_bytes(f"{epoch_dir_name(epoch)}/{CHECKPOINT_FILE}", data)
        for _, path in self.epoch_checkpoints()[:-keep]:
            self.delete_dir(path.rsplit("/", 1)[0])

    def keep_best_checkpoints(self, epoch: int, data: bytes, kept: list[int]) -> None:
        """run.keep_best K > 1: write this epoch's checkpoint as checkpoint_best_epoch_NNNN/ when it is among
        `kept` (the K best epochs), and delete those no longer among them."""
        if epoch in kept:
            self.write_bytes(f"checkpoint_best_epoch_{epoch:04d}/{CHECKPOINT_FILE}", data)
        if not self.exists(""):
            return
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False)):
            match = BEST_EPOCH_DIR_PATTERN.match(info.base_name)
            if match and int(match.group(1)) not in kept:
                self.delete_dir(info.base_name)

    def local_path(self, relative: str = "") -> Path:
        assert self.is_local, "only for local run folders"
        return Path(self.path(relative))


def read_uri_bytes(uri: str) -> bytes:
    """The bytes of one file named by a URI (s3://, gs://, file://); StorageError names it when unreadable."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"cannot read {uri}: {_cause(exc)}") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a local file through a temp file and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    temp.write_bytes(data)
    os.replace(temp, path)
