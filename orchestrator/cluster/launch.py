"""The driver side of `orchestrator train`: open the run folder, then run the workers, showing progress.

`open_run` finds where a re-run resumes (it writes nothing).
`build_trainer(spec, plan, queue)` turns spec and plan into a `TorchTrainer` (ScalingConfig,
RunConfig with FailureConfig and CheckpointConfig). `train_on_ray` runs it in a thread while the
main thread renders the workers' progress events; `train_local` runs `fit` in this process (world
size 1, no Ray imported), keeping the latest `run.keep_checkpoints` as Ray would. The Ray session
itself (start, join, logs, auth, stop) is `session.py`'s.
"""

from __future__ import annotations

import os

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console

from orchestrator.cluster.session import ray_log_path, stop_ray
from orchestrator.config.errors import Interrupted
from orchestrator.config.plan import Plan
from orchestrator.config.spec import JobSpec
from orchestrator.store.storage import SPEC_FILE, SUMMARY_FILE, RunFolder, absolute_storage
from orchestrator.train.progress import ProgressView, seconds_since_process_start

if TYPE_CHECKING:
    from orchestrator.train.run import WorkerEnv


@dataclass
class OpenRun:
    folder: RunFolder
    resume_from: str | None
    """relative path of the checkpoint the run resumes from: the newest that loads (the run's
    workers say which newer ones they skip, and why)"""
    resume_epoch: int | None
    """last finished epoch of that checkpoint (0-based)"""
    changed_keys: list[str]
    """spec keys that differ from the run's saved spec.yaml"""
    resume_steps: int = 0
    """steps of the next epoch done too (a mid-epoch checkpoint)"""


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def open_run(spec: JobSpec) -> OpenRun:
    """Find the checkpoint a re-run resumes from and how the job differs from the saved spec.yaml.

    Writes nothing: spec.yaml and plan.json are written by the run itself once it has started
    (model built, weights and checkpoint loaded), so a re-run that fails its checks changes nothing.
    """
    import yaml

    from orchestrator.train.resume import find_resume_point

    folder = RunFolder(spec.run.storage, spec.name)
    found, _ = find_resume_point(lambda: None, folder)
    changed = []
    if found and folder.exists(SPEC_FILE):
        changed = _diff_keys(yaml.safe_load(folder.read_bytes(SPEC_FILE)) or {}, spec.to_dict())
    if found is None:
        return OpenRun(folder, None, None, changed)
    payload, where = found
    return OpenRun(folder, where.removeprefix(folder.uri + "/"), payload["epoch"], changed, payload.get("epoch_steps", 0))


def say_resume(console: Console, start: OpenRun, epochs: int) -> None:
    if start.resume_from is None:
        console.print(f"run folder: {start.folder.uri}")
        return
    done = start.resume_epoch + 1
    remaining = "nothing left to train: re-evaluating the best checkpoint" if done >= epochs else f"epochs {done + 1}..{epochs} remain"
    inside = f" and {start.resume_steps} steps of epoch {done + 1}" if start.resume_steps else ""
    console.print(f"[bold yellow]resuming[/bold yellow] {start.folder.uri} from {start.resume_from} "
                  f"(epoch {done} of {epochs} done{inside}; {remaining})")
    if start.changed_keys:
        console.print(f"[yellow]warning:[/yellow] the job differs from the run's saved spec.yaml in: {', '.join(start.changed_keys)}")


def local_env(spec: JobSpec, emit) -> WorkerEnv:
    """The in-process worker: rank 0 of 1, checkpoints straight into the run folder, `emit` shows progress."""
    import torch

    from orchestrator.train.run import WorkerEnv

    folder = RunFolder(spec.run.storage, spec.name)
    device = torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")

    def report(row: dict, data: bytes | None, epoch: int) -> None:
        folder.write_epoch_checkpoint(epoch, data, spec.run.keep_checkpoints)

    return WorkerEnv(rank=0, world_size=1, device=device, wrap_model=lambda model: model, report=report,
                     restore=lambda: None, emit=emit)


def train_local(spec: JobSpec, plan: Plan, console: Console, splits=None) -> tuple[dict, float | None]:
    """`fit` in this process, world size 1, on `splits` when the plan was made from them: (summary,
    seconds from process start to the first step)."""
    from orchestrator.train.fit import fit

    try:
        with ProgressView(console) as view:
            summary = fit(spec, plan, local_env(spec, view.handle), splits)
    except KeyboardInterrupt:
        raise RunInterrupted(RunFolder(spec.run.storage, spec.name)) from None
    return summary, seconds_since_process_start(view.first_step_at)


def track_report(spec: JobSpec, console: Console) -> None:
    """A run that logs to MLflow (its folder's mlflow.json) gets its report as artifacts, from the driver."""
    from orchestrator.after.report import run_report
    from orchestrator.train.tracking import reopen_tracking

    folder = RunFolder(spec.run.storage, spec.name)
    tracker = reopen_tracking(folder, console.print)
    if tracker is not None:
        tracker.log_files("report", run_report(folder))


RESIZE_CHECK_S = 10.0
"""an elastic run: how often Ray Train checks whether the cluster has room for more workers"""


def build_trainer(spec: JobSpec, plan: Plan, queue=None, callbacks: list | None = None):
    """The TorchTrainer for this spec and plan (gloo on CPU, NCCL on GPU: Ray's defaults).

    `queue`: where rank 0 sends progress events; `callbacks`: Ray Train callbacks (a sweep's
    TuneReportCallback).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from orchestrator.cluster.worker import Trainer, fault_from_env, train_fn

    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    datasets = None
    if spec.data.loader == "ray_data":
        from orchestrator.cluster.ray_data import train_dataset
        from orchestrator.data.sources import load_splits

        _check_cpus_left_to_decode(spec, plan)
        datasets = {"train": train_dataset(spec.data, load_splits(spec.data, spec.seed).train)}
    return Trainer(
        train_fn,
        train_loop_config={"spec": spec.to_dict(), "plan": plan.to_dict(), "queue": queue, "fault": fault_from_env(),
                           "mlflow_tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")},
        scaling_config=ScalingConfig(num_workers=(scaling.min_workers, scaling.max_workers) if scaling.elastic else plan.world_size,
                                     use_gpu=scaling.use_gpu, resources_per_worker=resources,
                                     placement_strategy=scaling.ray_placement,
                                     **({"elastic_resize_monitor_interval_s": RESIZE_CHECK_S} if scaling.elastic else {})),
        run_config=RunConfig(name=spec.name, storage_path=absolute_storage(spec.run.storage),
                             failure_config=FailureConfig(max_failures=spec.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.run.keep_checkpoints),
                             callbacks=callbacks),
        datasets=datasets,
    )


def _check_cpus_left_to_decode(spec: JobSpec, plan: Plan) -> None:
    """PlanError when the trainers take every CPU of the cluster: Ray Data's decode tasks would never run."""
    import ray

    from orchestrator.config.plan import PlanError

    total = ray.cluster_resources().get("CPU", 0.0)
    taken = plan.world_size * spec.scaling.cpus_per_worker
    if total - taken < 1:
        raise PlanError(f"data.loader: ray_data decodes in Ray tasks of 1 CPU, but the cluster has {total:g} CPUs and the "
                        f"{plan.world_size} trainers take {taken:g} (scaling.cpus_per_worker {spec.scaling.cpus_per_worker:g}); "
                        "lower scaling.cpus_per_worker, add CPU nodes, or use data.loader: torch")


def _drain(events, view: ProgressView, done: threading.Event) -> None:
    """Show events until the trainer has finished and the queue is empty."""
    from ray.util.queue import Empty

    while not (done.is_set() and events.empty()):
        try:
            view.handle(events.get(timeout=1.0))   # returns as soon as an event arrives
        except Empty:
            pass


class RunInterrupted(Interrupted):
    """Ctrl-C on the driver: the workers were stopped; the run folder holds the completed epochs."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        latest = folder.latest_checkpoint()
        where = f"the latest checkpoint is {folder.uri}/{latest}" if latest else "no epoch had finished, so nothing was saved"
        super().__init__(f"interrupted: workers stopped; {where}; re-run the same command to resume")


def on_this_node() -> dict:
    """Actor options that keep an actor on the driver's node: the progress queue must not live on a worker
    node that an elastic run may lose."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                                 soft=False)}


def train_on_ray(spec: JobSpec, plan: Plan, console: Console) -> tuple[dict, float | None]:
    """Fit a TorchTrainer on the running Ray while showing progress.

    Returns (the summary rank 0 wrote, seconds from process start to the first step).
    """
    from ray.util.queue import Queue

    folder = RunFolder(spec.run.storage, spec.name)
    events = Queue(maxsize=10_000, actor_options=on_this_node())
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
    workers = (f"{spec.scaling.min_workers} to {spec.scaling.max_workers} (elastic)" if spec.scaling.elastic
               else str(plan.world_size))
    console.print(f"[dim]starting {workers} Ray Train workers (Ray's log: {ray_log_path(spec)})[/dim]")
    try:
        with ProgressView(console) as view:
            _drain(events, view, done)
    except KeyboardInterrupt:
        stop_ray(console)
        raise RunInterrupted(folder) from None
    thread.join()
    if "error" in outcome:
        from orchestrator.cluster.failure_policy import worker_error

        raise worker_error(outcome["error"]) or outcome["error"]
    return view.summary or folder.read_json(SUMMARY_FILE), seconds_since_process_start(view.first_step_at)
