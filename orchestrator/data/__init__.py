"""Data: sources (digits, image folders, Parquet, synthetic), splits, transforms and loaders.

The builtin digits live beside this file as `digits.parquet` (see tools/make_digits.py).
"""

from orchestrator.data.datasets import ImageReadError, eval_loader, make_dataset, train_loader
from orchestrator.data.sources import DataError, Split, Splits, load_splits, stratified_split

__all__ = ["DataError", "ImageReadError", "Split", "Splits", "eval_loader", "load_splits", "make_dataset",
           "stratified_split", "train_loader"]
