"""Issue 25: what fine-tuners reach for: early stopping and the k best checkpoints (item 4), imbalance (item 3)."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import tiny_job

from orchestrator.cli import main
from orchestrator.store.metrics import best_epochs, early_stop


def rows(metric: str, values: list[float]) -> list[dict]:
    return [{"epoch": epoch, metric: value} for epoch, value in enumerate(values)]


def test_early_stop_counts_epochs_without_an_improvement_larger_than_min_delta():
    assert early_stop(rows("val_loss", [1.0, 0.9, 0.95, 0.91]), "val_loss", patience=2) == (3, 1)
    assert early_stop(rows("val_loss", [1.0, 0.9, 0.95, 0.89]), "val_loss", patience=2) is None   # improved in time
    assert early_stop(rows("val_acc1", [0.5, 0.6, 0.6, 0.61]), "val_acc1", patience=2, min_delta=0.02) == (3, 1)
    assert early_stop(rows("val_acc1", [0.5, 0.4, 0.3]), "val_acc1", patience=3) is None
    assert best_epochs([{"epoch": 0, "val_acc1": 0.5, "val_loss": 1.0}, {"epoch": 1, "val_acc1": 0.7, "val_loss": 0.8},
                        {"epoch": 2, "val_acc1": 0.7, "val_loss": 0.6}, {"epoch": 3, "val_acc1": 0.6, "val_loss": 0.5}],
                       3) == [2, 1, 3]


def test_a_run_stops_early_keeps_the_best_k_and_a_rerun_does_not_train_on(tmp_path, write_job, capsys):
    # min_delta 1.0: accuracy can never improve by more than a whole, so the run stops `patience` epochs in
    job = write_job(tiny_job(tmp_path / "runs", "es", scaling={"num_workers": 1},
                             schedule={"epochs": 6, "warmup_epochs": 0,
                                       "early_stopping": {"metric": "val_acc1", "patience": 2, "min_delta": 1.0}},
                             run={"keep_best": 2}))
    assert main(["train", str(job), "--local"]) == 0
    out = capsys.readouterr().out
    assert "early stopping: val_acc1 has not improved by more than 1 for 2 epochs (best at epoch 1); " \
           "stopped after epoch 3 of 6" in " ".join(out.split())
    run = tmp_path / "runs" / "es"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stopped_early_at_epoch"] == 3 and summary["epochs_completed"] == 3
    assert summary["test_acc1"] is not None                                # the best weights were evaluated
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    kept = sorted(p.name for p in run.glob("checkpoint_best_epoch_*"))
    assert kept == sorted(f"checkpoint_best_epoch_{e:04d}" for e in best_epochs(metrics, 2)) and len(kept) == 2
    assert (run / "checkpoint_best" / "checkpoint.pt").is_file()
    assert main(["train", str(job), "--local"]) == 0                       # the re-run stops where the run did
    assert "epoch    4" not in capsys.readouterr().out
    assert len(pq.read_table(run / "metrics.parquet").to_pylist()) == 3
    assert json.loads((run / "summary.json").read_text())["stopped_early_at_epoch"] == 3


def test_early_stopping_names_a_metric_it_cannot_watch(tmp_path, write_job, capsys):
    job = write_job(tiny_job(tmp_path, "bad", schedule={"early_stopping": {"metric": "val_acc2"}}))
    assert main(["validate", str(job)]) == 2
    assert "schedule.early_stopping.metric" in capsys.readouterr().err


@pytest.mark.parametrize("keep_best", [0])
def test_keep_best_is_at_least_one(tmp_path, write_job, capsys, keep_best):
    job = write_job(tiny_job(tmp_path, "kb", run={"keep_best": keep_best}))
    assert main(["validate", str(job)]) == 2
    assert "run.keep_best" in capsys.readouterr().err


# item 3: imbalance: loss.class_weights, data.sampler, val_balanced_acc and val_macro_f1

def imbalanced_digits(root, train_counts: dict[int, int], val_per_class: int = 30):
    """An image folder of digits with `train_counts` training images per class and a balanced val split."""
    import numpy as np
    from PIL import Image

    from orchestrator.config.spec import DataSpec
    from orchestrator.data.sources import load_splits

    train = load_splits(DataSpec(source="builtin:digits", val_fraction=0.0), 0).train
    for label, count in train_counts.items():
        images = train.items[train.labels == label]
        for split, chosen in (("train", images[:count]), ("val", images[-val_per_class:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i, pixels in enumerate(chosen):
                Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{i}.png")
    return root


def test_balanced_weights_or_sampler_raise_balanced_accuracy_on_imbalanced_digits(tmp_path, write_job, capsys):
    tree = imbalanced_digits(tmp_path / "digits", {0: 120, 1: 6, 2: 6})
    common = {"data": {"source": f"imagefolder:{tree}", "image_size": 16, "classes": None, "max_per_class": None},
              "scaling": {"num_workers": 1}, "schedule": {"epochs": 6, "warmup_epochs": 0},
              "optim": {"name": "sgd", "base_lr": 0.03, "base_batch_size": 32}}
    final = {}
    for name, extra in (("plain", {}), ("weighted", {"loss": {"class_weights": "balanced"}}),
                        ("sampled", {"data": {**common["data"], "sampler": "balanced"}})):
        job = write_job(tiny_job(tmp_path / "runs", name, **{**common, **extra}), f"{name}.yaml")
        assert main(["train", str(job), "--local"]) == 0
        final[name] = pq.read_table(tmp_path / "runs" / name / "metrics.parquet").to_pylist()[-1]
    out = capsys.readouterr().out
    assert "class weights" in out and "0.367, 7.33, 7.33" in " ".join(out.split())   # 132 / (3 x 120), 132 / (3 x 6)
    # measured here (val balanced acc after 6 epochs, with 2 and with 1 torch thread): plain 0.578 / 0.544, balanced
    # sampler 0.756 / 0.778, balanced weights 0.589 / 0.500. At base_lr 0.1 and 4 epochs the figures swung by 0.2
    # with the thread count alone (plain 0.689 / 0.500, sampler 0.678 / 0.711): too chaotic a regime to assert on
    assert final["sampled"]["val_balanced_acc"] > final["plain"]["val_balanced_acc"] + 0.1
    assert final["weighted"]["train_loss"] != final["plain"]["train_loss"]     # the weights reach the loss
    assert all(0 <= row["val_macro_f1"] <= 1 for row in final.values())


def test_balanced_accuracy_and_macro_f1_match_their_definitions():
    import torch

    from orchestrator.train.loop import class_balanced_scores

    # 3 classes: images 4, 2, 0; correct 3, 1, 0; predicted 5, 1, 0 (one class-0 prediction was a class-1 image)
    balanced, f1 = class_balanced_scores(torch.tensor([[4, 2, 0], [3, 1, 0], [5, 1, 0]], dtype=torch.float64))
    assert balanced == pytest.approx((3 / 4 + 1 / 2) / 2)                  # the class without images left out
    assert f1 == pytest.approx((2 * 3 / (4 + 5) + 2 * 1 / (2 + 1)) / 2)


def test_shards_refuse_the_balanced_sampler_and_counted_weights(tmp_path, write_job, capsys):
    job = write_job(tiny_job(tmp_path, "sh", data={"source": "shards:/nowhere", "sampler": "balanced"},
                             loss={"class_weights": "balanced"}))
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert "data.sampler: balanced draws images by index" in err and "loss.class_weights: balanced counts" in err


# item 6: report RUN [RUN ...] --out DIR

def test_report_puts_a_fine_tune_and_a_scratch_run_on_shared_axes(tmp_path, write_job, capsys):
    runs = tmp_path / "runs"
    source = write_job(tiny_job(runs, "source", scaling={"num_workers": 1}, schedule={"epochs": 1, "warmup_epochs": 0}),
                       "source.yaml")
    assert main(["train", str(source), "--local"]) == 0
    for name, weights in (("finetune", str(runs / "source")), ("scratch", None)):
        job = write_job(tiny_job(runs, name, model={"weights": weights}, scaling={"num_workers": 1, "per_worker_batch_size": 16},
                                 schedule={"epochs": 2, "warmup_epochs": 0}), f"{name}.yaml")
        assert main(["train", str(job), "--local"]) == 0
    capsys.readouterr()
    assert main(["report", str(runs / "finetune"), str(runs / "scratch")]) == 2     # several runs need --out
    assert "give --out DIR" in capsys.readouterr().err
    out = tmp_path / "compare"
    assert main(["report", str(runs / "finetune"), str(runs / "scratch"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "index.html", "loss.png", "lr.png", "val_loss.png"]
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "finetune" in page and "scratch" in page
    assert f"{runs / 'source'}" in page                                         # the facts name each run's weights
    summary = json.loads((runs / "scratch" / "summary.json").read_text())
    assert f"{summary['test_acc1']:.4g}" in page                               # and its final figures
