"""What every command shares: the consoles, how a user error is said, the options of job and cluster
commands, writing a command's files, holding a run folder, and SIGTERM handled as Ctrl-C is."""

from __future__ import annotations

import argparse
import threading

from rich.console import Console
from rich.markup import escape

from orchestrator.config.errors import plain_text

EXIT_USER_ERROR = 2

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def report_user_error(exc: BaseException) -> int:
    """Each of the error's lines as `error: ...` on stderr; the exit code of a user error."""
    lines = getattr(exc, "problems", None) or str(exc).splitlines() or [type(exc).__name__]
    for line in lines:
        err_console.print(f"[red]error:[/red] {escape(plain_text(line))}", markup=True, soft_wrap=True)
    return EXIT_USER_ERROR


def add_job_options(p: argparse.ArgumentParser) -> None:
    """The job file and its `--set` overrides."""
    p.add_argument("job", help="YAML job file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job-file key, value typed as YAML (repeatable), e.g. --set optim.base_lr=0.01")


def add_cluster_options(p: argparse.ArgumentParser, address_help: str, required: bool = False,
                        verbose_help: str | None = None) -> None:
    """--address (the cluster), --insecure and, when `verbose_help` says what it shows, --verbose."""
    p.add_argument("--address", required=required, help=address_help)
    if verbose_help:
        p.add_argument("--verbose", action="store_true", help=verbose_help)
    p.add_argument("--insecure", action="store_true", help="allow plain http (or, with a token, Ray's gRPC without TLS) to another machine; says what it risks")


def write_local(path, data: bytes) -> None:
    """write_atomic, with a failure as one line (StorageError, exit 1) instead of a traceback."""
    from orchestrator.store.storage import StorageError, write_atomic  # pyarrow: not for every command

    try:
        write_atomic(path, data)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None

def write_outputs(folder, subdir: str, out: str | None, files: dict[str, bytes]) -> str:
    """Write each file into `out` (a local folder) or else into the run folder's `subdir`; returns where.
    Everything is in memory before the first write, and each file is written atomically."""
    from pathlib import Path

    if out:
        for name, data in files.items():
            write_local(Path(out) / name, data)
        return str(Path(out).resolve())
    for name, data in files.items():
        folder.write_bytes(f"{subdir}/{name}", data)
    return f"{folder.uri}/{subdir}"


def hold_run_folder(spec, command: str):
    """The run folder's lock (exit 2 naming the holder when another run has it); says what it took over."""
    from orchestrator.store.runlock import RunLock
    from orchestrator.store.storage import RunFolder

    lock = RunLock(RunFolder(spec.run.storage, spec.name), command).acquire()
    for note in lock.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    return lock


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, schedulers and Kubernetes send): handled as Ctrl-C is, exit 143."""


received_sigterm = threading.Event()
"""set by the SIGTERM handler: the exit code says SIGTERM (143) even when a library (Ray's get, say)
caught the Terminated it raised and raised a KeyboardInterrupt of its own"""


def raise_terminated(signum, frame) -> None:
    received_sigterm.set()
    raise Terminated()


def interrupted_exit(exc: BaseException) -> int:
    """143 after SIGTERM, 130 after Ctrl-C."""
    seen = exc
    while seen is not None:
        if isinstance(seen, Terminated):
            return 143
        seen = seen.__context__
    return 143 if received_sigterm.is_set() else 130
