"""The Ray session of a driver: token auth, start or join, where Ray's logs go, stop.

Used by `train` (launch.py), `sweep` and `submit`/`jobs`. Token auth: a new local Ray turns it on
by itself when a token exists; a client sends the token only when `RAY_AUTH_MODE=token` is set in
its own environment before Ray is imported (`prefer_token_auth`). The token is never read or
printed here.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from rich.console import Console

from orchestrator.config.spec import JobSpec
from orchestrator.store.storage import RAY_LOG_FILE, RunFolder


def auth_token_available() -> bool:
    """Whether a Ray auth token is configured for this user (it is never read or printed here)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return True
    return (Path.home() / ".ray" / "auth_token").is_file()


def prefer_token_auth() -> None:
    """Say RAY_AUTH_MODE=token when a token exists and the user said nothing.

    A new local Ray turns token auth on by itself when a token exists (and a child process warns
    about it on screen); a client needs the variable to send the token to a protected --address.
    Ray reads it when imported, so this only acts before the first `import ray`.
    """
    if "ray" not in sys.modules and "RAY_AUTH_MODE" not in os.environ and auth_token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


def route_ray_logs(log_path: Path | None, verbose: bool) -> None:
    """Ray's own log lines go to log_path (the run folder) unless verbose."""
    logger = logging.getLogger("ray")
    if verbose or log_path is None:
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)


def start_ray(address: str | None, verbose: bool, log_path: Path | None) -> None:
    """Connect to `address`, or start a local Ray; reuse a Ray this process already started."""
    prefer_token_auth()
    import ray

    if ray.is_initialized():
        return
    route_ray_logs(log_path, verbose)
    # No address: a new local Ray, as promised, rather than Ray's default of joining whatever cluster
    # runs on this machine; RAY_ADDRESS (set by Ray Jobs for an entrypoint) still counts.
    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=verbose, configure_logging=verbose)
    _restore_sigterm_handler(sigterm)


def _restore_sigterm_handler(handler) -> None:
    """Put back the SIGTERM handler the driver had (the CLI's: stop the workers, keep the checkpoints,
    exit 143); ray.init replaces it with its own, which exits at once (code 15, or 134 from its C++ one)."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def ray_log_path(spec: JobSpec) -> Path:
    """The run folder's ray.log, or a temp file when the run folder is not local."""
    folder = RunFolder(spec.run.storage, spec.name)
    return folder.local_path(RAY_LOG_FILE) if folder.is_local else Path(tempfile.gettempdir()) / f"orchestrator-{spec.name}-ray.log"


def start_ray_for(spec: JobSpec, address: str | None, verbose: bool) -> None:
    """Start (or join) Ray for this run, Ray's log lines going to the run folder's ray.log."""
    start_ray(address, verbose, ray_log_path(spec))


def stop_ray(console: Console) -> None:
    """Stop this driver's Ray work: a local Ray it started goes down whole; on a cluster, its job's
    actors and placement groups are released when the driver disconnects."""
    import ray

    console.print("[yellow]interrupted:[/yellow] stopping the workers ...")
    ray.shutdown()
