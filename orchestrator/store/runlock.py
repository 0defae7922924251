"""One writer per run folder: `run.lock` in the folder, held by the driver for the whole run.

The lock file is JSON: host, pid, command, started_at and heartbeat_at (seconds since the epoch)
and a random token. It is created atomically on a local (or NFS-mounted) folder (`O_CREAT|O_EXCL`).
Object stores have no atomic create through pyarrow, so there the lock is a lease: written when
absent, read back after a settle delay to see who won (best effort against two starts in the same
second). A thread refreshes `heartbeat_at` every `HEARTBEAT_S`. A lock is stale, and taken over
with a message, when its process is gone (same host, dead pid) or its heartbeat is older than
`LEASE_S` (another host, or a frozen process). Taking over renames the stale lock away first, so
two runs taking over the same stale lock cannot both win on a local folder.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from orchestrator.config.errors import UserError
from orchestrator.store.storage import LOCK_FILE, RunFolder, RunFolderUnusable, StorageError

HEARTBEAT_S = 30.0
LEASE_S = 180.0
"""a heartbeat older than this makes the lock stale: 6 missed beats"""
SETTLE_S = 1.0
"""object stores: how long to wait before reading back a freshly written lease"""


class RunLocked(UserError):
    """Another run holds the run folder; the message names it (exit 2)."""


@dataclass
class Holder:
    host: str
    pid: int
    command: str
    started_at: float
    heartbeat_at: float
    token: str

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"pid {self.pid} on {self.host} ({self.command}, started {started}, last heartbeat {time.time() - self.heartbeat_at:.0f} s ago)"

    def stale_because(self) -> str | None:
        """Why this holder no longer holds the lock, or None while it does."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"pid {self.pid} on this host is gone"
        age = time.time() - self.heartbeat_at
        if age > LEASE_S:
            return f"its last heartbeat is {age:.0f} s old (lease {LEASE_S:.0f} s)"
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(folder: RunFolder) -> Holder | None:
    """Who holds the folder's lock (maybe a stale holder: see `stale_because`), or None when unlocked."""
    try:
        return Holder(**json.loads(folder.read_bytes(LOCK_FILE)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError, OSError):   # a lock half-written by a run that died: stale
        return Holder("?", -1, "?", 0.0, 0.0, "")


def live_holder(folder: RunFolder) -> Holder | None:
    """The holder of the folder's lock while it still holds it (a run is writing there now), else None."""
    holder = read_holder(folder)
    return holder if holder is not None and holder.stale_because() is None else None


class RunLock:
    """`with RunLock(folder, "train"):` holds the folder's lock; `notes` say what was taken over or swept."""

    def __init__(self, folder: RunFolder, command: str):
        self.folder, self.command = folder, command
        self.token = uuid.uuid4().hex
        self.notes: list[str] = []
        self._created_folder = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _me(self) -> Holder:
        now = time.time()
        return Holder(socket.gethostname(), os.getpid(), self.command, now, now, self.token)

    def _read(self) -> Holder | None:
        return read_holder(self.folder)

    def acquire(self) -> RunLock:
        self._created_folder = not self.folder.exists("")
        try:
            self.folder.fs.create_dir(self.folder.root, recursive=True)
        except OSError as exc:
            raise RunFolderUnusable(f"run.storage: cannot create the run folder {self.folder.uri}: "
                                    f"{exc.strerror or exc}") from None
        if not self._try_create():
            holder = self._read()
            reason = holder.stale_because() if holder else "it vanished"
            if reason is None:
                raise RunLocked(f"{self.folder.uri} is in use by another run: {holder.describe()}; wait for it, "
                                f"stop it, or give this job another name (if that run is dead, delete {LOCK_FILE})")
            self._take_over(holder, reason)
        swept = self.folder.sweep_temp_files()
        if swept:
            self.notes.append(f"removed {len(swept)} temporary file(s) left by an interrupted write: {', '.join(swept[:3])}")
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _encoded(self, holder: Holder) -> bytes:
        return (json.dumps(holder.__dict__, indent=2) + "\n").encode()

    def _try_create(self) -> bool:
        """Create the lock if absent; True when this run holds it."""
        me = self._me()
        if self.folder.is_local:
            try:
                fd = os.open(self.folder.path(LOCK_FILE), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            except OSError as exc:
                raise RunFolderUnusable(f"run.storage: cannot write {self.folder.uri}/{LOCK_FILE}: {exc.strerror}") from None
            with os.fdopen(fd, "wb") as out:
                out.write(self._encoded(me))
            return True
        if self.folder.exists(LOCK_FILE):
            return False
        self._write(me, unusable=True)
        time.sleep(SETTLE_S)
        holder = self._read()
        return holder is not None and holder.token == self.token

    def _write(self, holder: Holder, unusable: bool = False) -> None:
        try:
            self.folder.write_bytes(LOCK_FILE, self._encoded(holder))
        except StorageError as exc:
            raise (RunFolderUnusable(f"run.storage: {exc}") if unusable else exc) from None

    def _take_over(self, holder: Holder, reason: str) -> None:
        if self.folder.is_local:
            aside = self.folder.path(f"{LOCK_FILE}.stale-{self.token[:8]}")
            try:
                os.rename(self.folder.path(LOCK_FILE), aside)   # atomic: one of two takers gets here
                os.unlink(aside)
            except FileNotFoundError:
                pass
        else:
            self.folder.fs.delete_file(self.folder.path(LOCK_FILE))
        if not self._try_create():
            current = self._read()
            raise RunLocked(f"{self.folder.uri} was just taken by another run: "
                            f"{current.describe() if current else 'unknown'}")
        self.notes.append(f"took over the lock of {holder.describe()}: {reason}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = self._read()
            if holder is None or holder.token != self.token:
                print(f"warning: the lock of {self.folder.uri} is no longer this run's", file=sys.stderr)
                return
            holder.heartbeat_at = time.time()
            try:
                self._write(holder)
            except StorageError:
                pass   # the next beat tries again; a lease expires only after LEASE_S

    def release(self) -> None:
        """Drop the lock (if still ours); a folder this run created and left empty goes too."""
        self._stop.set()
        holder = self._read()
        if holder is not None and holder.token == self.token:
            try:
                self.folder.fs.delete_file(self.folder.path(LOCK_FILE))
            except OSError:
                return
        if self._created_folder and self.folder.is_local:
            try:
                os.rmdir(self.folder.root)   # only when empty: a run that never started leaves nothing
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
