"""The metric row: one per finished epoch, in `metrics.parquet`, the checkpoint and the progress view.

Owns every metric's name: the columns of a row (`epoch_row` builds it), the metrics a sweep or
ReduceLROnPlateau may watch and which direction is better (`WATCHABLE`, kept in `config.catalog`), how the best epoch is
chosen (`improved`), and the columns the driver prints per epoch (`DISPLAY`). No torch, no ray.
"""

from __future__ import annotations

from orchestrator.config.catalog import WATCHABLE

LR_PREFIX = "lr/"
DISPLAY = (("train_loss", 10, 4), ("val_loss", 9, 4), ("val_acc1", 8, 4), ("val_acc5", 8, 4))
"""(column, width, decimals) the progress view prints for every epoch, after the epoch number"""


def lr_column(group_name: str) -> str:
    return f"{LR_PREFIX}{group_name}"


def group_lrs(row: dict) -> dict[str, float]:
    """{group name: LR at the epoch's last step} from a row."""
    return {key[len(LR_PREFIX):]: value for key, value in row.items() if key.startswith(LR_PREFIX)}


def epoch_row(epoch: int, step: int, lrs: dict[str, float], train, val, wall_s: float, world_size: int = 1) -> dict:
    """The row of a finished epoch (0-based) after `step` optimizer steps in all, on `world_size` workers.

    `lrs`: group name -> LR; `train`: loop.EpochStats; `val`: loop.EvalStats; `wall_s`: seconds since
    the run started (resumes included). Times in seconds, images_per_s over the training part;
    data_wait_s: of train_s, the seconds rank 0 waited for its loader's next batch.
    """
    row = {"epoch": epoch, "step": step, **{lr_column(name): lr for name, lr in lrs.items()}}
    row.update({
        "train_loss": train.train_loss, "val_loss": val.loss, "val_acc1": val.acc1, "val_acc5": val.acc5,
        "val_balanced_acc": val.balanced_acc, "val_macro_f1": val.macro_f1,
        "images_per_s": train.images / train.seconds if train.seconds > 0 else 0.0,
        "train_s": train.seconds, "data_wait_s": train.data_wait_s, "val_s": val.seconds, "epoch_s": train.seconds + val.seconds, "wall_s": wall_s,
        "world_size": world_size,
    })
    return row


def improved(best: dict | None, row: dict) -> bool:
    """Whether `row` beats the best so far: higher val_acc1, ties broken by lower val_loss."""
    if best is None:
        return True
    value, old = row["val_acc1"], best["val_acc1"]
    return value > old or (value == old and row["val_loss"] < best["val_loss"])



def early_stop(rows: list[dict], metric: str, patience: int, min_delta: float = 0.0) -> tuple[int, int] | None:
    """(epoch at which a run stops early, epoch of the metric's best), 0-based, or None while it trains on:
    the first epoch that ends `patience` epochs without the metric improving on its best by more than
    min_delta (in the direction catalog.WATCHABLE gives). A pure function of the rows, so every rank and
    a resumed run decide alike."""
    sign = 1.0 if WATCHABLE[metric] == "max" else -1.0
    best_value, best_epoch = None, None
    for row in rows:
        value = row.get(metric)
        if value is None:
            continue
        if best_value is None or sign * (value - best_value) > min_delta:
            best_value, best_epoch = value, row["epoch"]
        elif row["epoch"] - best_epoch >= patience:
            return row["epoch"], best_epoch
    return None


def best_epochs(rows: list[dict], k: int) -> list[int]:
    """The epochs of the k best rows, best first, in `improved`'s order (val acc@1, then lower val loss,
    then the earlier epoch: the one `improved` kept)."""
    ranked = sorted(rows, key=lambda row: (-row["val_acc1"], row["val_loss"], row["epoch"]))
    return [row["epoch"] for row in ranked[:k]]
