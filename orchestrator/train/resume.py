"""Resuming: which checkpoint a run goes on from, and a trainer restored from it.

`find_resume_point` picks the newest checkpoint that loads (what Ray hands back, the run folder's epoch
checkpoints, its mid-epoch checkpoint); `restore_trainee` puts the optimizer (switched by SWATS if it
had been), SWATS, the GradScaler and the EMA back as they were. The format is `train.checkpoint`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from orchestrator.config.spec import JobSpec
from orchestrator.store.storage import STEP_CHECKPOINT, RunFolder, StorageError
from orchestrator.train.checkpoint import CheckpointError, decode
from orchestrator.train.loop import Trainee
from orchestrator.train.optim import switch_to_sgd


def find_resume_point(handed_back: Callable[[], tuple[bytes, str] | None],
                      folder: RunFolder) -> tuple[tuple[dict, str] | None, list[str]]:
    """((payload, where) to resume from, or None; lines saying which checkpoints were skipped and why).

    Candidates, newest first: what the framework hands back (a Ray restart or re-run), then the run
    folder's epoch checkpoints. The first that loads wins: a corrupt latest checkpoint (a write cut
    short, a damaged disk) costs an epoch, not the run. The run folder's mid-epoch checkpoint
    (run.checkpoint_every_steps) wins over it when it is further on (more optimizer steps done).
    """
    chosen, skipped = _latest_epoch_checkpoint(handed_back, folder)
    if folder.exists(STEP_CHECKPOINT):
        where = f"{folder.uri}/{STEP_CHECKPOINT}"
        try:
            payload = decode(folder.read_bytes(STEP_CHECKPOINT), where)
            if chosen is None or payload["step"] > chosen[0]["step"]:
                chosen = (payload, where)
        except (CheckpointError, StorageError, OSError) as exc:
            skipped.append(f"skipped {where}: {str(exc).removeprefix(f'cannot load checkpoint {where}: ')}")
    return chosen, skipped


def _latest_epoch_checkpoint(handed_back: Callable[[], tuple[bytes, str] | None],
                             folder: RunFolder) -> tuple[tuple[dict, str] | None, list[str]]:
    candidates: list[tuple[Callable[[], bytes], str]] = []
    found = handed_back()
    if found is not None:
        candidates.append((lambda: found[0], found[1]))
    for _, relative in reversed(folder.epoch_checkpoints()):
        where = f"{folder.uri}/{relative}"
        if not any(_same_checkpoint(where, seen) for _, seen in candidates):
            candidates.append((lambda relative=relative: folder.read_bytes(relative), where))
    skipped = []
    for read_data, where in candidates:
        try:
            return (decode(read_data(), where), where), skipped
        except (CheckpointError, StorageError, OSError) as exc:
            skipped.append(f"skipped {where}: {str(exc).removeprefix(f'cannot load checkpoint {where}: ')}")
    return None, skipped


def _same_checkpoint(a: str, b: str) -> bool:
    """The same epoch checkpoint seen through Ray's path and through the run folder's."""
    return a.rstrip("/").split("/")[-2:] == b.rstrip("/").split("/")[-2:]


def restore_trainee(trainee: Trainee, payload: dict, spec: JobSpec) -> None:
    """Optimizer (switched by SWATS if it had been), SWATS tracker, GradScaler and EMA as the checkpoint left them."""
    if trainee.ema is not None:
        if payload.get("ema"):
            trainee.ema.load_state_dict(payload["ema"])
        else:   # the EMA was switched on for the resumed part: it starts from the weights as they are
            trainee.ema.update_parameters(trainee.model)

    if trainee.swats and payload.get("swats"):
        trainee.swats.load_state_dict(payload["swats"])
    switched = payload["optimizer_name"] != trainee.optimizer_name   # SWATS switched before the checkpoint
    if switched:
        trainee.optimizer = switch_to_sgd(trainee.optimizer, trainee.swats, spec.optim, 1.0)
        trainee.optimizer_name = payload["optimizer_name"]
    load_optimizer_state(trainee.optimizer, payload["optimizer"], keep_base_lr=switched)
    if trainee.scaler and payload.get("scaler"):
        trainee.scaler.load_state_dict(payload["scaler"])


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, keep_base_lr: bool) -> None:
    """Per-parameter state (momentum, Adam moments) from the checkpoint; hyperparameters from the job.

    So a run resumed with a lower LR or another weight decay (say after a divergence) uses them.
    `keep_base_lr`: keep the checkpoint's base_lr (SWATS estimated it at the switch).
    """
    from_job = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit this job's parameter groups ({exc}); "
                              "did optim.param_groups, optim.name or model.freeze change?") from None
    for group, settings in zip(optimizer.param_groups, from_job):
        saved_base_lr = group["base_lr"]
        group.update(settings)
        if keep_base_lr:
            group["base_lr"] = saved_base_lr
