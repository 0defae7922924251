"""Weights files written by other tools, read by their content and never unpickled beyond tensors.

A file is recognised by its first bytes, not its name: safetensors (an 8-byte header length, then
JSON), or what `torch.save` writes (a zip, or the legacy pickle). Torch files load with
`weights_only=True`; a few harmless globals that training scripts put beside the weights
(`argparse.Namespace`, pathlib paths, numpy scalars) are allowed for that load only, everything
else stays refused with a message naming it. The state dict is then found under the keys the
usual tools write it to (torchvision's references, timm's CheckpointSaver, Lightning, this tool),
with the EMA weights taken per `model.weights_ema`. Imports no Ray.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy
import torch

from orchestrator.config.errors import JobError, plain_text

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin", ".safetensors")
"""names that mark a remote URI as a file rather than a run folder; local files are read by content"""

MODEL_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params", "model_state")
"""where tools put the trained weights: Lightning and timm `state_dict`, torchvision's references and this
tool `model`, HF-style and tutorial scripts `model_state_dict`, older scripts `module`/`net`"""
EMA_KEYS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict", "model_ema_state_dict", "ema_model", "ema_state")
"""where tools put the EMA weights: torchvision's references `model_ema`, timm `state_dict_ema`, this tool `ema`"""

EmaChoice = Literal["auto"] | bool


class WeightsError(JobError):
    """Weights that cannot be found or read; the message says what and where."""


class _AttributeDict(dict):
    """Stands in for Lightning's AttributeDict (a dict with attribute access) in saved hyper-parameters."""


def _safe_globals() -> list:
    """Globals training scripts save beside their weights, harmless to build: argparse arguments, paths,
    numpy scalars of plain dtypes, Lightning's hyper-parameter dict (rebuilt as a plain dict, not its class)."""
    core = getattr(numpy, "_core", None) or numpy.core  # numpy 2 pickles numpy._core, numpy 1 numpy.core
    plain_dtypes = [name for name in dir(numpy.dtypes)
                    if name.endswith("DType") and name not in ("ObjectDType", "VoidDType", "StringDType")]
    return [
        argparse.Namespace,
        *(getattr(pathlib, name) for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
        numpy.dtype,
        (core.multiarray.scalar, "numpy._core.multiarray.scalar"),
        (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
        *((getattr(numpy.dtypes, name), f"numpy.dtypes.{name}") for name in plain_dtypes),
        (_AttributeDict, "lightning.fabric.utilities.data.AttributeDict"),
        (_AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    ]


SAFE_GLOBALS = _safe_globals()


@dataclass
class FileWeights:
    state_dict: dict[str, torch.Tensor]
    note: str | None = None
    """which part of the file was taken, when it held more than a state dict"""


def read_weights(source: Path | bytes, where: str, ema: EmaChoice = "auto") -> FileWeights:
    """The state dict of a weights file (a local path, or its bytes read from run storage).

    `ema` (model.weights_ema): auto takes the EMA weights when the file holds them, true requires them,
    false takes the trained model's. Raises WeightsError saying what the file is and what was wrong.
    """
    head = _first_bytes(source)
    if _is_safetensors(head):
        return FileWeights(_read_safetensors(source, where))
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise WeightsError(f"model.weights: {where} is not a weights file (neither safetensors nor written by "
                           "torch.save)")
    return choose_state_dict(_torch_load(source, where), where, ema)


def _first_bytes(source: Path | bytes) -> bytes:
    if isinstance(source, bytes):
        return source[:16]
    with open(source, "rb") as file:
        return file.read(16)


def _is_safetensors(head: bytes) -> bool:
    return len(head) > 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(source: Path | bytes, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load, load_file

    try:
        return load(source) if isinstance(source, bytes) else load_file(str(source))
    except Exception as exc:
        raise WeightsError(f"model.weights: cannot read safetensors file {where}: {plain(str(exc))}") from None


def _torch_load(source: Path | bytes, where: str):
    refused = unsafe_globals(source)
    if refused:
        raise WeightsError(refused_message(where, refused))
    opened = io.BytesIO(source) if isinstance(source, bytes) else source
    mapped = not isinstance(source, bytes) and _first_bytes(source).startswith(b"PK")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(opened, map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as exc:
        found = re.findall(r"GLOBAL (\S+)", plain(str(exc)))
        if found:
            raise WeightsError(refused_message(where, found)) from None
        raise WeightsError(f"model.weights: cannot load {where} with weights_only=True: {plain(str(exc))}") from None


def unsafe_globals(source: Path | bytes) -> list[str]:
    """The globals of a torch.save zip file that a weights_only load with SAFE_GLOBALS refuses, read
    from its pickle without building anything; [] for legacy files (their load says it instead)."""
    opened = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(opened))
    except Exception:
        return []


def refused_message(where: str, refused: list[str]) -> str:
    """Why a file with these pickled globals is not read, and how to re-save it."""
    names = ", ".join(refused[:4]) + (f" and {len(refused) - 4} more" if len(refused) > 4 else "")
    if any(re.match(r"(torch|torchvision|timm|lightning|pytorch_lightning)\.\S*\.[A-Z]", name) for name in refused):
        return (f"model.weights: {where} holds a whole pickled model ({names}), which cannot be read safely; save "
                "its weights instead: torch.save(model.state_dict(), PATH)")
    return (f"model.weights: {where} pickles {names} beside its weights; weights_only=True refuses it because "
            "building it could run code from the file. If you trust the file, re-save its weights: python -c "
            f"\"import torch; c = torch.load('{where}', weights_only=False); "
            f"torch.save(c.get('state_dict', c.get('model', c)), '{where}.weights.pt')\"")


def choose_state_dict(payload, where: str, ema: EmaChoice) -> FileWeights:
    """The state dict a loaded file holds: itself, or the one under MODEL_KEYS / EMA_KEYS (see read_weights)."""
    if _is_tensor_mapping(payload):
        if ema is True:
            raise WeightsError(f"model.weights_ema: {where} is a plain state dict without EMA weights; set "
                               "model.weights_ema to auto or false")
        return FileWeights(payload)
    if not isinstance(payload, dict):
        raise WeightsError(f"model.weights: {where} holds a {type(payload).__name__}, not a state dict")
    model_key, weights = _first_under(payload, MODEL_KEYS)
    ema_key, ema_weights = _first_under(payload, EMA_KEYS)
    keys = ", ".join(map(str, list(payload)[:10]))
    if ema is True and ema_weights is None:
        raise WeightsError(f"model.weights_ema: {where} holds no EMA weights (looked under {', '.join(EMA_KEYS)}; "
                           f"its keys: {keys})")
    if ema_weights is not None and ema is not False:
        other = f"; model.weights_ema: false takes {model_key!r}" if model_key else ""
        return FileWeights(ema_weights, f"took the EMA weights under {ema_key!r}{other}")
    if weights is None:
        raise WeightsError(f"model.weights: {where} holds no state dict under the keys tools write it to "
                           f"({', '.join(MODEL_KEYS)}); its keys: {keys}")
    also = f" (EMA weights under {ema_key!r} left out: model.weights_ema is false)" if ema_weights is not None else ""
    return FileWeights(weights, f"took the state dict under {model_key!r}{also}")


def _first_under(payload: dict, keys: tuple[str, ...]) -> tuple[str | None, dict | None]:
    """The first of `keys` holding a state dict (also one level down, e.g. {'model': {'state_dict': ...}})."""
    for key in keys:
        value = payload.get(key)
        if _is_tensor_mapping(value):
            return key, _without_averaging(value)
        if isinstance(value, dict):
            inner, tensors = _first_under(value, MODEL_KEYS)
            if tensors is not None:
                return f"{key}.{inner}", tensors
    return None, None


def _without_averaging(state: dict) -> dict:
    """A state dict without torch's AveragedModel wrapping: its `n_averaged` counter dropped and the
    `module.` prefix it puts on every key removed (torchvision's references and this tool keep EMA so)."""
    if "n_averaged" not in state:
        return state
    rest = {k: v for k, v in state.items() if k != "n_averaged"}
    if rest and all(k.startswith("module.") for k in rest):
        return {k.removeprefix("module."): v for k, v in rest.items()}
    return rest


def _is_tensor_mapping(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def plain(text: str) -> str:
    """A library's message fit for one line of ours: whole, its ANSI escapes removed, its lines joined."""
    return " ".join(plain_text(text).split())
