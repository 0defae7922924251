"""`orchestrator train --local`: the same `fit` in this process, world size 1, no Ray.

Checkpoints go straight into the run folder (`checkpoint_epoch_NNNN/`), keeping the latest
`run.keep_checkpoints` as Ray would; a re-run resumes from the latest one.
"""

from __future__ import annotations

import torch

from orchestrator.fit import WorkerEnv, fit
from orchestrator.plan import Plan
from orchestrator.spec import JobSpec
from orchestrator.storage import CHECKPOINT_FILE, RunFolder, epoch_dir_name


def local_env(spec: JobSpec, emit) -> WorkerEnv:
    folder = RunFolder(spec.run.storage, spec.name)
    device = torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")

    def report(row: dict, data: bytes | None, epoch: int) -> None:
        folder.write_bytes(f"{epoch_dir_name(epoch)}/{CHECKPOINT_FILE}", data)
        for old_epoch, path in folder.epoch_checkpoints()[: -spec.run.keep_checkpoints]:
            folder.delete_dir(path.rsplit("/", 1)[0])

    return WorkerEnv(rank=0, world_size=1, device=device, wrap_model=lambda model: model, report=report,
                     restore=lambda: None, emit=emit)


def run_local(spec: JobSpec, plan: Plan, emit) -> dict:
    return fit(spec, plan, local_env(spec, emit))
