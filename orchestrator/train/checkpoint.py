"""The checkpoint's format: its schema, writing it and reading it back (`train.resume` picks the one to
resume from and restores a trainer from it).

A checkpoint is one versioned dict, serialised with torch.save and read with weights_only=True.
Keys: version, model (unwrapped from DDP, CPU tensors), ema (AveragedModel's state dict, or None),
optimizer, optimizer_name (the name of the optimizer in use: SWATS changes it), swats, scaler,
epoch (the last finished epoch, 0-based),
step (optimizer steps done), metric_history (for plateau), best, rows (the metric rows so far),
wall_s (seconds of training so far), rng (states of torch, numpy and random on rank 0), spec, plan,
and, in a mid-epoch checkpoint (`run.checkpoint_every_steps`), epoch_steps (steps of epoch + 1 done),
tally (that epoch's running sums on rank 0) and rng_by_rank (every rank's RNG states).
`encode` writes them; `decode` reads them, and `TrainingState.from_payload`, `evaluated_weights`
and `train.resume.restore_trainee` take them apart.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from orchestrator.config.errors import JobError

if TYPE_CHECKING:
    from orchestrator.config.plan import Plan
    from orchestrator.config.spec import JobSpec
    from orchestrator.store.storage import RunFolder

CHECKPOINT_VERSION = 1


class Saved(Protocol):
    """What a checkpoint takes from a trainer (`train.loop.Trainee` is one)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    swats: Any
    scaler: Any
    ema: Any


class CheckpointError(JobError):
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
    resizes: list[dict] = field(default_factory=list)
    """an elastic run's changes of worker count so far: {epoch, step, from, to}"""

    @classmethod
    def from_payload(cls, payload: dict) -> "TrainingState":
        return cls(payload["epoch"] + 1, payload["step"], list(payload["metric_history"]), list(payload["rows"]),
                   payload["best"], payload["wall_s"], payload.get("epoch_steps", 0), payload.get("tally"),
                   payload.get("rng_by_rank"), list(payload.get("resizes") or []))


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


def encode(trainee: Saved, state: TrainingState, spec: JobSpec, plan: Plan, mid_epoch: dict | None = None) -> bytes:
    """The checkpoint of the epoch just finished (state.rows[-1]), as bytes; with `mid_epoch`
    ({epoch_steps, tally, rng_by_rank, wall_s}) a checkpoint inside the epoch after the last row."""
    payload = {
        "version": CHECKPOINT_VERSION, "model": cpu_state_dict(trainee.model),
        "optimizer": trainee.optimizer.state_dict(), "optimizer_name": trainee.optimizer_name,
        "swats": trainee.swats.state_dict() if trainee.swats else None,
        "scaler": trainee.scaler.state_dict() if trainee.scaler else None,
        "epoch": state.rows[-1]["epoch"] if state.rows else -1, "step": state.step, "metric_history": state.metric_history,
        "rows": state.rows, "best": state.best, "resizes": state.resizes, "wall_s": state.rows[-1]["wall_s"] if state.rows else 0.0, "rng": rng_state(),
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


def with_rows(data: bytes, where: str, rows: list[dict]) -> bytes:
    """The checkpoint `data` with its metric rows replaced (PBT: a trial goes on from another's weights and
    optimizer state, keeping its own history)."""
    payload = decode(data, where)
    payload["rows"] = rows
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def read(folder: RunFolder, relative: str) -> dict:
    """The checkpoint at `relative` in a run folder."""
    return decode(folder.read_bytes(relative), f"{folder.uri}/{relative}")


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
