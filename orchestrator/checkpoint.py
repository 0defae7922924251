"""The checkpoint: its schema, writing it, finding the one to resume from and restoring from it.

A checkpoint is one versioned dict, serialised with torch.save and read with weights_only=True.
Keys: version, model (unwrapped from DDP, CPU tensors), ema (AveragedModel's state dict, or None),
optimizer, optimizer_name (the name of the optimizer in use: SWATS changes it), swats, scaler,
epoch (the last finished epoch, 0-based),
step (optimizer steps done), metric_history (for plateau), best, rows (the metric rows so far),
wall_s (seconds of training so far), rng (states of torch, numpy and random on rank 0), spec, plan,
and, in a mid-epoch checkpoint (`run.checkpoint_every_steps`), epoch_steps (steps of epoch + 1 done),
tally (that epoch's running sums on rank 0) and rng_by_rank (every rank's RNG states).
`encode` writes them and `TrainingState.from_payload` / `restore_trainee` read them: nowhere else.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from orchestrator.loop import Trainee
    from orchestrator.plan import Plan
    from orchestrator.spec import JobSpec
    from orchestrator.storage import RunFolder

CHECKPOINT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model; the message says which file."""


@dataclass
class TrainingState:
    """What a checkpoint carries besides weights and optimizer state."""

    next_epoch: int = 0
    step: int = 0
    """optimizer steps done"""
    metric_history: list[float] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    best: dict | None = None
    wall_s: float = 0.0
    """seconds of training before this process started"""
    epoch_steps: int = 0
    """steps of epoch `next_epoch` already done (a mid-epoch checkpoint); they are included in `step`"""
    tally: dict | None = None
    """the running sums of those steps (loop.Tally.to_dict())"""
    rng_by_rank: list | None = None

    @classmethod
    def from_payload(cls, payload: dict) -> "TrainingState":
        return cls(payload["epoch"] + 1, payload["step"], list(payload["metric_history"]), list(payload["rows"]),
                   payload["best"], payload["wall_s"], payload.get("epoch_steps", 0), payload.get("tally"),
                   payload.get("rng_by_rank"))


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "random": list(random.getstate()[1]),
    }


def set_rng_state(saved: dict) -> None:
    """Put back what rng_state() took."""
    numpy = saved["numpy"]
    torch.set_rng_state(saved["torch"])
    np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    random.setstate((3, tuple(saved["random"]), None))


def encode(trainee: Trainee, state: TrainingState, spec: JobSpec, plan: Plan, mid_epoch: dict | None = None) -> bytes:
    """The checkpoint of the epoch just finished (state.rows[-1]), as bytes; with `mid_epoch`
    ({epoch_steps, tally, rng_by_rank, wall_s}) a checkpoint inside the epoch after the last row."""
    payload = {
        "version": CHECKPOINT_VERSION, "model": cpu_state_dict(trainee.model),
        "optimizer": trainee.optimizer.state_dict(), "optimizer_name": trainee.optimizer_name,
        "swats": trainee.swats.state_dict() if trainee.swats else None,
        "scaler": trainee.scaler.state_dict() if trainee.scaler else None,
        "epoch": state.rows[-1]["epoch"] if state.rows else -1, "step": state.step, "metric_history": state.metric_history,
        "rows": state.rows, "best": state.best, "wall_s": state.rows[-1]["wall_s"] if state.rows else 0.0, "rng": rng_state(),
        "spec": spec.to_dict(), "plan": plan.to_dict(),
        "ema": {k: v.detach().cpu() for k, v in trainee.ema.state_dict().items()} if trainee.ema is not None else None,
    }
    if mid_epoch is not None:
        payload.update(mid_epoch, epoch=state.rows[-1]["epoch"] if state.rows else -1)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def decode(data: bytes, where: str) -> dict:
    """The checkpoint dict, loaded with weights_only=True; CheckpointError naming `where` otherwise."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot load checkpoint {where}: {first}") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{where} is not a checkpoint of this tool (no 'model' key)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{where} has checkpoint version {payload.get('version')}, this tool reads {CHECKPOINT_VERSION}")
    return payload


def read(folder: RunFolder, relative: str) -> dict:
    """The checkpoint at `relative` in a run folder."""
    return decode(folder.read_bytes(relative), f"{folder.uri}/{relative}")


def find_resume_point(handed_back: Callable[[], tuple[bytes, str] | None],
                      folder: RunFolder) -> tuple[tuple[dict, str] | None, list[str]]:
    """((payload, where) to resume from, or None; lines saying which checkpoints were skipped and why).

    Candidates, newest first: what the framework hands back (a Ray restart or re-run), then the run
    folder's epoch checkpoints. The first that loads wins: a corrupt latest checkpoint (a write cut
    short, a damaged disk) costs an epoch, not the run. The run folder's mid-epoch checkpoint
    (run.checkpoint_every_steps) wins over it when it is further on (more optimizer steps done).
    """
    from orchestrator.storage import STEP_CHECKPOINT, StorageError

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
    from orchestrator.storage import StorageError

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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (or torch.compile)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def cpu_state_dict(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def load_model_state(model: torch.nn.Module, state: dict, where: str) -> None:
    """Strict load into the unwrapped model; a mismatch names the file and the first keys."""
    result = unwrap(model).load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:3])}")
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:3])}")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not fit the model: {'; '.join(problems)}")


def evaluated_weights(payload: dict) -> dict:
    """The weights a checkpoint's run evaluated: its EMA's (without AveragedModel's `module.` prefix and
    counter) when it kept one, else the model's."""
    ema = payload.get("ema")
    if not ema:
        return payload["model"]
    return {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}


def restore_trainee(trainee: Trainee, payload: dict, spec: JobSpec) -> None:
    """Optimizer (switched by SWATS if it had been), SWATS tracker, GradScaler and EMA as the checkpoint left them."""
    from orchestrator.optim import switch_to_sgd

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
