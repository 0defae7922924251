"""The driver side of `orchestrator train`: run folder, Ray start-up, TorchTrainer, progress.

`prepare_run` writes `spec.yaml` and `plan.json` and says whether the run resumes.
`build_trainer(spec, plan, queue)` turns spec and plan into a `TorchTrainer` (ScalingConfig,
RunConfig with FailureConfig and CheckpointConfig). `train_on_ray` runs it in a thread while the
main thread renders the workers' progress events; `train_local` runs `fit` in-process.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from orchestrator.plan import Plan
from orchestrator.progress import ProgressView
from orchestrator.spec import JobSpec, spec_to_yaml
from orchestrator.storage import PLAN_FILE, SPEC_FILE, SUMMARY_FILE, RunFolder, absolute_storage

RAY_LOG_FILE = "ray.log"


@dataclass
class RunStart:
    folder: RunFolder
    resume_from: str | None
    """relative path of the checkpoint the run resumes from"""
    resume_epoch: int | None
    """last finished epoch of that checkpoint (0-based)"""
    changed_keys: list[str]
    """spec keys that differ from the run's saved spec.yaml"""


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def prepare_run(spec: JobSpec, plan: Plan) -> RunStart:
    """Write spec.yaml and plan.json into the run folder; find the checkpoint a re-run resumes from."""
    import yaml

    folder = RunFolder(spec.run.storage, spec.name)
    checkpoints = folder.epoch_checkpoints()
    changed = []
    if checkpoints and folder.exists(SPEC_FILE):
        changed = _diff_keys(yaml.safe_load(folder.read_bytes(SPEC_FILE)) or {}, spec.to_dict())
    folder.write_text(SPEC_FILE, spec_to_yaml(spec))
    folder.write_json(PLAN_FILE, plan.to_dict())
    epoch, path = checkpoints[-1] if checkpoints else (None, None)
    return RunStart(folder, path, epoch, changed)


def say_resume(console: Console, start: RunStart, epochs: int) -> None:
    if start.resume_from is None:
        console.print(f"run folder: {start.folder.uri}")
        return
    done = start.resume_epoch + 1
    remaining = "nothing left to train: re-evaluating the best checkpoint" if done >= epochs else f"epochs {done + 1}..{epochs} remain"
    console.print(f"[bold yellow]resuming[/bold yellow] {start.folder.uri} from {start.resume_from} "
                  f"(epoch {done} of {epochs} done; {remaining})")
    if start.changed_keys:
        console.print(f"[yellow]warning:[/yellow] the job differs from the run's saved spec.yaml in: {', '.join(start.changed_keys)}")


_IMPORTED_AT = time.time()


def process_start_time() -> float:
    """Wall-clock time this process started (Linux: from /proc; elsewhere: when this module was imported)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + start_ticks / ticks
    except (OSError, ValueError, StopIteration, IndexError):
        return _IMPORTED_AT


def seconds_since_process_start(at: float | None) -> float | None:
    """Seconds from this process's start to the wall-clock time `at`."""
    return None if at is None else at - process_start_time()


def train_local(spec: JobSpec, plan: Plan, console: Console) -> tuple[dict, float | None]:
    """(summary, seconds from process start to the first step)."""
    from orchestrator.local import run_local

    with ProgressView(console) as view:
        summary = run_local(spec, plan, view.handle)
    return summary, seconds_since_process_start(view.first_step_at)


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


def start_ray(address: str | None, verbose: bool, log_path: Path | None) -> None:
    """Connect to `address`, or start a local Ray; reuse a Ray this process already started."""
    prefer_token_auth()
    import ray

    if ray.is_initialized():
        return
    route_ray_logs(log_path, verbose)
    # No address: a new local Ray, as promised, rather than Ray's default of joining whatever cluster
    # runs on this machine; RAY_ADDRESS (set by Ray Jobs for an entrypoint) still counts.
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=verbose, configure_logging=verbose)


def build_trainer(spec: JobSpec, plan: Plan, queue=None, callbacks: list | None = None):
    """The TorchTrainer for this spec and plan (gloo on CPU, NCCL on GPU: Ray's defaults).

    `queue`: where rank 0 sends progress events; `callbacks`: Ray Train callbacks (a sweep's
    TuneReportCallback).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.worker import fault_from_env, train_fn

    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_fn,
        train_loop_config={"spec": spec.to_dict(), "plan": plan.to_dict(), "queue": queue, "fault": fault_from_env()},
        scaling_config=ScalingConfig(num_workers=plan.world_size, use_gpu=scaling.use_gpu, resources_per_worker=resources,
                                     placement_strategy=scaling.placement_strategy),
        run_config=RunConfig(name=spec.name, storage_path=absolute_storage(spec.run.storage),
                             failure_config=FailureConfig(max_failures=spec.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.run.keep_checkpoints),
                             callbacks=callbacks),
    )


def _drain(events, view: ProgressView, done: threading.Event) -> None:
    """Show events until the trainer has finished and the queue is empty."""
    from ray.util.queue import Empty

    while not (done.is_set() and events.empty()):
        try:
            view.handle(events.get(timeout=1.0))   # returns as soon as an event arrives
        except Empty:
            pass


class RunInterrupted(Exception):
    """Ctrl-C on the driver: the workers were stopped; the run folder holds the completed epochs."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        latest = folder.latest_checkpoint()
        where = f"the latest checkpoint is {folder.uri}/{latest}" if latest else "no epoch had finished, so nothing was saved"
        super().__init__(f"interrupted: workers stopped; {where}; re-run the same command to resume")


def stop_ray(console: Console) -> None:
    """Stop this driver's Ray work: a local Ray it started goes down whole; on a cluster, its job's
    actors and placement groups are released when the driver disconnects."""
    import ray

    console.print("[yellow]interrupted:[/yellow] stopping the workers ...")
    ray.shutdown()


def ray_log_path(spec: JobSpec) -> Path:
    folder = RunFolder(spec.run.storage, spec.name)
    return folder.local_path(RAY_LOG_FILE) if folder.is_local else Path(tempfile.gettempdir()) / f"orchestrator-{spec.name}-ray.log"


def start_ray_for(spec: JobSpec, address: str | None, verbose: bool) -> None:
    """Start (or join) Ray for this run, Ray's log lines going to the run folder's ray.log."""
    start_ray(address, verbose, ray_log_path(spec))


def train_on_ray(spec: JobSpec, plan: Plan, console: Console) -> tuple[dict, float | None]:
    """Fit a TorchTrainer on the running Ray while showing progress.

    Returns (the summary rank 0 wrote, seconds from process start to the first step).
    """
    from ray.util.queue import Queue

    folder = RunFolder(spec.run.storage, spec.name)
    events = Queue(maxsize=10_000)
    trainer = build_trainer(spec, plan, events)
    outcome: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # shown by the main thread
            outcome["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=run, name="trainer-fit", daemon=True)
    thread.start()
    console.print(f"[dim]starting {plan.world_size} Ray Train workers (Ray's log: {ray_log_path(spec)})[/dim]")
    try:
        with ProgressView(console) as view:
            _drain(events, view, done)
    except KeyboardInterrupt:
        stop_ray(console)
        raise RunInterrupted(folder) from None
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return view.summary or folder.read_json(SUMMARY_FILE), seconds_since_process_start(view.first_step_at)
