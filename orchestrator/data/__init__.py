"""Data: sources (digits, image folders, Parquet, synthetic), splits, transforms and loaders.

The builtin digits live beside this file as `digits.parquet` (see tools/make_digits.py).
Names are imported on first use (PEP 562): reading a source or validating a job file
(`data.sources`, numpy only) does not import torch and torchvision (~3 s), which the transforms and
loaders of `data.datasets` need.
"""

from importlib import import_module

_HOMES = {"ImageReadError": "datasets", "eval_loader": "datasets", "make_dataset": "datasets", "train_loader": "datasets",
          "DataError": "sources", "Split": "sources", "Splits": "sources", "load_splits": "sources",
          "stratified_split": "sources"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
