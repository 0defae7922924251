"""Ray Train glue: the function each TorchTrainer worker runs. Thin by design.

It reads spec and plan from the trainer config, builds a `WorkerEnv` from Ray's context (rank,
device, DDP through `prepare_model`, checkpoints through `ray.train.report` and
`ray.train.get_checkpoint`) and hands over to `fit.fit`, which imports no Ray. Progress events go
to the driver through a `ray.util.queue.Queue`. `ORCHESTRATOR_FAULT_AT_STEP` (and
`ORCHESTRATOR_FAULT_RANK`, default the last rank) in the driver's environment kill one worker once
after that optimizer step, to test recovery.

`Trainer` is a TorchTrainer that does not retry a `JobError` (a corrupt image, weights that do
not fit: a retry gives the same error); other failures get `run.max_failures` restarts as before
(the policy and why it lives apart: `failure_policy.py`).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import torch
from ray.train.torch import TorchTrainer

from orchestrator.cluster.elastic_policy import LiveNodesPolicy
from orchestrator.cluster.failure_policy import FinalErrorsPolicy
from orchestrator.config.plan import Plan
from orchestrator.config.spec import JobSpec
from orchestrator.store.storage import CHECKPOINT_FILE, WORKERS_FILE, RunFolder, epoch_dir_name, write_atomic
from orchestrator.train.fit import fit
from orchestrator.train.run import WorkerEnv

if FinalErrorsPolicy is not None:
    class Trainer(TorchTrainer):
        """A TorchTrainer whose controller does not retry the job's own errors (see failure_policy) and, when
        elastic, counts only live nodes (see elastic_policy)."""

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller_init_kwargs["failure_policy"] = FinalErrorsPolicy(self.run_config.failure_config)
            if self.scaling_config.elasticity_enabled and LiveNodesPolicy is not None:
                controller_init_kwargs["scaling_policy"] = LiveNodesPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)
else:  # pragma: no cover
    Trainer = TorchTrainer


EPOCHS_DONE = "epochs_done"
FAULT_STEP_ENV = "ORCHESTRATOR_FAULT_AT_STEP"
FAULT_RANK_ENV = "ORCHESTRATOR_FAULT_RANK"
FAULT_NODE_ENV = "ORCHESTRATOR_FAULT_NODE"
"""1: the fault takes the worker's whole node down (its process group: raylet, agents, workers), as a lost
machine would; it fires on a rank that runs on a worker node started by `orchestrator up` (never the head)"""
FAULT_MARKER = "fault_injected.json"
FAULT_DELAY_S = 3.0   # longer than the controller's ~2 s poll, so the last report counts


def fault_from_env() -> dict | None:
    """Fault injection asked for in the driver's environment: kill one worker once after a given step."""
    step = os.environ.get(FAULT_STEP_ENV)
    if not step:
        return None
    return {"step": int(step), "rank": int(os.environ.get(FAULT_RANK_ENV, "-1")), "node": os.environ.get(FAULT_NODE_ENV) == "1"}


def fault_hook(fault: dict | None, rank: int, world_size: int, folder):
    """A step hook that kills this worker's process (as a dying machine would) once, after fault['step'].

    The marker file in the run folder makes it happen once, across the restarts it causes. With
    fault["node"], it kills this worker's node instead (`own_node_group`), on whichever rank runs on one.
    """
    if fault is None:
        return None
    group = own_node_group() if fault.get("node") else None
    chosen = group is not None if fault.get("node") else rank == (fault["rank"] if fault["rank"] >= 0 else world_size - 1)
    if not chosen:
        return None

    def hook(step: int) -> None:
        if step != fault["step"] or folder.exists(FAULT_MARKER):
            return
        time.sleep(FAULT_DELAY_S)
        folder.write_json(FAULT_MARKER, {"step": step, "rank": rank, "time": time.time(), "node": group is not None})
        if group is not None:
            os.killpg(group, signal.SIGKILL)
        os._exit(1)

    return hook


def own_node_group() -> int | None:
    """The process group of this worker's node when it is a worker node `orchestrator up` started (a
    `ray start --block` leads the group of the raylet, this worker's parent: local_cluster.start_node; a
    worker has a group of its own), else None (the head, or a Ray this tool did not start: killing that
    group could take the driver with it)."""
    try:
        group = os.getpgid(os.getppid())
    except OSError:
        return None
    try:
        leader = Path(f"/proc/{group}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return group if b"start" in leader and b"--block" in leader and b"--head" not in leader else None


def _emitter(queue):
    """Fire-and-forget progress events: the worker never waits for the driver's queue actor."""
    def emit(event: dict) -> None:
        if queue is None:
            return
        try:
            queue.actor.put_nowait.remote(event)   # in order per caller; a full queue drops the event
        except Exception:
            pass
    return emit


def record_placement(folder: RunFolder, rank: int, world_size: int, local_rank: int) -> None:
    """Rank 0 writes where every rank runs (node id, host, local rank, device) to workers.json.

    On nodes that share one IP (several Ray nodes on one machine) Ray V2 counts local_rank across
    them; nothing here depends on it: the device comes from Ray's own assignment (get_device).
    """
    import socket

    import ray
    import ray.train.torch
    import torch.distributed as dist

    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
          "local_rank": local_rank, "device": str(ray.train.torch.get_device()), "pid": os.getpid()}
    everyone = [None] * world_size
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(everyone, me)
    else:
        everyone = [me]
    if rank == 0:
        folder.write_json(WORKERS_FILE, everyone)


def train_fn(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    spec = JobSpec.model_validate(config["spec"])
    plan = Plan.from_dict(config["plan"])
    if config.get("mlflow_tracking_uri"):   # the driver's MLFLOW_TRACKING_URI reaches rank 0's tracking (train/tracking.py)
        os.environ.setdefault("MLFLOW_TRACKING_URI", config["mlflow_tracking_uri"])
    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))

    def wrap_model(model: torch.nn.Module) -> torch.nn.Module:
        if spec.scaling.sync_bn and context.get_world_size() > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def report(row: dict, data: bytes | None, epoch: int) -> None:
        metrics = {**row, EPOCHS_DONE: epoch + 1}   # a clock that survives restarts (a sweep's ASHA reads it)
        if data is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            write_atomic(Path(folder) / CHECKPOINT_FILE, data)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder), checkpoint_dir_name=epoch_dir_name(epoch))

    def restore():
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return (Path(folder) / CHECKPOINT_FILE).read_bytes(), f"{checkpoint.path}/{CHECKPOINT_FILE}"

    rank, world_size = context.get_world_rank(), context.get_world_size()
    plan = plan.for_world_size(world_size)   # an elastic run on fewer workers than its max: the plan's row for them
    folder = RunFolder(spec.run.storage, spec.name)
    env = WorkerEnv(rank=rank, world_size=world_size, device=ray.train.torch.get_device(), wrap_model=wrap_model,
                    report=report, restore=restore,
                    emit=_emitter(config.get("queue")) if rank == 0 else (lambda event: None),
                    step_hook=fault_hook(config.get("fault"), rank, world_size, folder),
                    on_start=lambda: record_placement(folder, rank, world_size, context.get_local_rank()))
    if spec.data.loader == "ray_data":
        from orchestrator.cluster.ray_data import epoch_batches

        env.train_batches = epoch_batches(plan.per_worker_batch_size, spec.seed)
    fit(spec, plan, env)
