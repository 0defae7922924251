"""A checkpoint is one versioned dict, serialised with torch.save and read with weights_only=True.

Keys: version, model (unwrapped from DDP, CPU tensors), optimizer, optimizer_name (the name of
the optimizer in use: SWATS changes it), swats, scaler, epoch (the last finished epoch, 0-based),
step (optimizer steps done), metric_history (for plateau), best, rows (the metric rows so far),
wall_s (seconds of training so far), rng (states of torch, numpy and random on rank 0), spec, plan.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch

CHECKPOINT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model; the message says which file."""


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "random": list(random.getstate()[1]),
    }


def to_bytes(payload: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes, where: str) -> dict:
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
