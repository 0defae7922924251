"""TensorBoard event files of a run, written by rank 0 into `<run folder>/tensorboard/`.

Every scalar's x axis is the optimizer step (steps done): per step, `step/train_loss_rank0`
(the loss of rank 0's micro-batches) and `lr/<group>`; per epoch, at the epoch's last step,
`epoch/<metric>` for the metric row's losses, accuracies, images/s and seconds. A resumed run
starts a new event file with `purge_step` at its first step, so TensorBoard drops what an
interrupted attempt logged past the checkpoint. On object storage the files are written in a local
temp folder and copied into the run folder (whole, through `RunFolder`) at every epoch's end, so
`tensorboard --logdir s3://...` sees every finished epoch. Imports no Ray.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from orchestrator.store.storage import TENSORBOARD_DIR, RunFolder

EPOCH_SCALARS = ("train_loss", "val_loss", "val_acc1", "val_acc5", "val_balanced_acc", "val_macro_f1", "images_per_s", "epoch_s", "train_s", "data_wait_s")
FLUSH_S = 10


class EventLog:
    def __init__(self, folder: RunFolder, steps_done: int):
        """`steps_done`: optimizer steps the run has done before this process (0, or the checkpoint's)."""
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self._staging = None if folder.is_local else tempfile.TemporaryDirectory(prefix="orchestrator-tensorboard-")
        self.local = folder.local_path(TENSORBOARD_DIR) if folder.is_local else Path(self._staging.name)
        self.writer = SummaryWriter(str(self.local), purge_step=steps_done + 1, flush_secs=FLUSH_S)

    def step(self, step: int, loss: float | None, lrs: dict[str, float]) -> None:
        """After optimizer step `step` (0-based): each group's LR, and rank 0's loss when the progress line
        read it (about 2/s, the first and last step of every epoch: other steps leave it on the device)."""
        if loss is not None:
            self.writer.add_scalar("step/train_loss_rank0", loss, step + 1)
        for name, lr in lrs.items():
            self.writer.add_scalar(f"lr/{name}", lr, step + 1)

    def epoch(self, row: dict) -> None:
        """A finished epoch's metric row, at its last step; flushed (and copied to object storage)."""
        for key in EPOCH_SCALARS:
            if row.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", row[key], row["step"])
        self.writer.flush()
        self._copy_out()

    def _copy_out(self) -> None:
        if self._staging is None:
            return
        for path in sorted(self.local.iterdir()):
            self.folder.write_bytes(f"{TENSORBOARD_DIR}/{path.name}", path.read_bytes())

    def close(self) -> None:
        self.writer.close()
        self._copy_out()
        if self._staging is not None:
            self._staging.cleanup()
