"""`orchestrator evaluate` and `predict`: a trained model on a split of data, or on image files.

`evaluate_split` runs the model over a whole split (the run's own data, or `--data SOURCE` with the
same classes) through the run's eval transform and counts top-1/top-5 hits per image as the
training loop's `evaluate` does, so on the run's test split its acc1 equals summary.json's
test_acc1. `predict_files` decodes every image first (one that does not decode stops it before
any output) and returns the top-k classes with softmax probabilities. Imports no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.after.trained import Trained, TrainedError

EVALUATED_SPLITS = ("test", "val", "train")
"""the splits `evaluate --split` may name"""


@dataclass
class Evaluation:
    split: str
    source: str
    acc1: float
    acc5: float
    images: int
    per_class: dict[str, float | None]
    """class name -> top-1 accuracy on its images (None when the split has none of it)"""
    confusion: np.ndarray
    """int64 (classes, classes): row = true class, column = predicted class"""

    @property
    def balanced_and_f1(self) -> tuple[float, float]:
        """(balanced accuracy, macro F1) from the confusion matrix, as the training loop computes them."""
        from orchestrator.train.loop import class_balanced_scores

        tally = np.stack([self.confusion.sum(axis=1), np.diag(self.confusion), self.confusion.sum(axis=0)])
        return class_balanced_scores(torch.from_numpy(tally).double())

    def to_json(self) -> dict:
        balanced, f1 = self.balanced_and_f1
        return {"acc1": self.acc1, "acc5": self.acc5, "balanced_acc": balanced, "macro_f1": f1,
                "per_class": self.per_class, "images": self.images}


def split_to_evaluate(trained: Trained, source: str | None, split: str):
    """(the split's data as a Split, its data spec): the run's data, or `source` with the run's other data keys."""
    from orchestrator.data.sources import load_splits

    spec = trained.spec
    if spec is None:
        raise TrainedError(f"{trained.where} is an exported model: evaluate needs a run folder (it reads the run's data)")
    data = spec.data if source is None else spec.data.model_validate({**spec.data.model_dump(), "source": source})
    splits = load_splits(data, spec.seed)
    if splits.class_names != trained.class_names:
        raise TrainedError(f"--data {data.source}: its classes ({', '.join(splits.class_names[:10])}) are not the run's "
                           f"({', '.join(trained.class_names[:10])}), in the same order")
    chosen = {"test": splits.test, "val": splits.val, "train": splits.train}[split]
    if chosen is None or len(chosen) == 0:
        raise TrainedError(f"--split {split}: {data.source} has no {split} split (it has: "
                           f"{', '.join(n for n in EVALUATED_SPLITS if {'test': splits.test, 'val': splits.val, 'train': splits.train}[n])})")
    return chosen, data


def evaluate_split(trained: Trained, source: str | None = None, split: str = "test") -> Evaluation:
    """acc@1, acc@5, per-class accuracy and the confusion matrix of the model on one split."""
    from orchestrator.data.loaders import EVAL_BATCH_SIZE, eval_loader, make_dataset

    chosen, data = split_to_evaluate(trained, source, split)
    loader = eval_loader(make_dataset(chosen, data, False, split), data, EVAL_BATCH_SIZE, 0, 1)
    classes = len(trained.class_names)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    hits1 = hits5 = count = 0.0   # float sums, as loop.evaluate adds them
    for images, labels in loader:
        logits = trained.logits(images)
        top = logits.topk(min(5, classes), dim=1).indices
        correct = top.eq(labels[:, None])
        hits1 += float(correct[:, :1].sum())
        hits5 += float(correct.any(dim=1).sum())
        count += len(labels)
        np.add.at(confusion, (labels.numpy(), top[:, 0].numpy()), 1)
    totals = confusion.sum(axis=1)
    per_class = {name: (float(confusion[i, i] / totals[i]) if totals[i] else None)
                 for i, name in enumerate(trained.class_names)}
    return Evaluation(split, data.source, hits1 / count, hits5 / count, int(count), per_class, confusion)


def confusion_png(evaluation: Evaluation, class_names: list[str], title: str) -> bytes:
    """The confusion matrix as a PNG: counts in each cell, rows true, columns predicted."""
    from orchestrator.after.report import figure_png, new_figure

    n = len(class_names)
    side = min(12.0, 2.5 + 0.45 * n)
    fig, ax = new_figure(side, side)
    ax.imshow(evaluation.confusion, cmap="Blues")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), class_names)
    if n <= 20:
        peak = max(1, int(evaluation.confusion.max()))
        for (i, j), value in np.ndenumerate(evaluation.confusion):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                        color="white" if value > peak / 2 else "black")
    return figure_png(fig)


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]
    """(class name, probability), most probable first"""

    def to_json(self) -> dict:
        return {"image": self.image, "top": [{"class": c, "prob": p} for c, p in self.top]}


def predict_files(trained: Trained, paths: list[str], top_k: int) -> list[Prediction]:
    """Top-k classes of each image file (decoded and transformed as the run evaluates); ImageReadError
    names the first file that does not decode, before anything is predicted."""
    from orchestrator.data.decode import decode_image
    from orchestrator.data.loaders import EVAL_BATCH_SIZE

    if top_k < 1:
        raise TrainedError(f"--top-k: {top_k}; give at least 1")
    transform = trained.preprocess.transform()
    upright = trained.preprocess.exif_transpose
    images = torch.stack([transform(decode_image(path, path, upright)) for path in paths])
    k = min(top_k, len(trained.class_names))
    predictions = []
    for start in range(0, len(paths), EVAL_BATCH_SIZE):
        probs = torch.softmax(trained.logits(images[start:start + EVAL_BATCH_SIZE]), dim=1)
        values, indices = probs.topk(k, dim=1)
        for offset, (row_p, row_i) in enumerate(zip(values.tolist(), indices.tolist())):
            predictions.append(Prediction(paths[start + offset],
                                          [(trained.class_names[i], p) for i, p in zip(row_i, row_p)]))
    return predictions
