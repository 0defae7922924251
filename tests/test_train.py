"""End to end: `orchestrator train` with --local and with real Ray Train workers (DDP over gloo)."""

import json
import re

import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_job

from orchestrator.cli import main
from orchestrator.config.spec import ModelSpec
from orchestrator.train.models import build_model

ROW_COLUMNS = {"epoch", "step", "train_loss", "val_loss", "val_acc1", "val_acc5", "images_per_s", "epoch_s", "wall_s"}


def check_run_folder(run, epochs: int, steps_per_epoch: int) -> list[dict]:
    for name in ("spec.yaml", "plan.json", "metrics.parquet", "summary.json", "model.safetensors", "checkpoint_best/checkpoint.pt"):
        assert (run / name).is_file(), name
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == list(range(epochs))
    assert [r["step"] for r in rows] == [steps_per_epoch * (e + 1) for e in range(epochs)]
    assert ROW_COLUMNS <= set(rows[0]) and any(k.startswith("lr/") for k in rows[0])
    assert all(r["epoch_s"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert rows[-1]["wall_s"] >= rows[0]["wall_s"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == epochs
    for key in ("test_acc1", "best_val_acc1", "epochs_completed", "wall_s"):
        assert summary[key] is not None
    assert 0.0 <= summary["test_acc1"] <= 1.0 and summary["test_images"] == 107
    checkpoint = torch.load(run / "checkpoint_best/checkpoint.pt", weights_only=True)
    assert checkpoint["version"] == 1 and {"model", "optimizer", "epoch", "step", "rng", "spec", "plan"} <= set(checkpoint)
    built = build_model(ModelSpec(arch="resnet18", weights=str(run / "model.safetensors")), 3, 16)
    assert built.report.skipped_shape == [] and built.report.missing == []
    return rows


def test_local_run_writes_the_run_folder_and_resumes(tmp_path, write_job, capsys):
    job = write_job(tiny_job(tmp_path / "runs", "local", scaling={"num_workers": 2}))
    assert main(["train", str(job), "--local"]) == 0
    run = tmp_path / "runs" / "local"
    rows = check_run_folder(run, epochs=2, steps_per_epoch=9)   # 3 classes x 24 images // 8 per step
    assert sorted(p.name for p in run.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0000", "checkpoint_epoch_0001"]
    out = capsys.readouterr().out
    assert "test acc@1" in out and "trainable parameters" in out

    assert main(["train", str(job), "--local", "--set", "schedule.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "checkpoint_epoch_0001" in out and "schedule.epochs" in out
    resumed = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    assert resumed[:2] == rows                                   # earlier rows kept exactly
    assert sorted(p.name for p in run.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]


@pytest.mark.ray
def test_ray_train_two_workers_run_folder_and_resume(ray_session, tmp_path, write_job, capsys):
    job = write_job(tiny_job(tmp_path / "runs", "ray2"))
    assert main(["train", str(job)]) == 0
    run = tmp_path / "runs" / "ray2"
    plan = json.loads((run / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["global_batch_size"] == 16 and plan["steps_per_epoch"] == 4
    rows = check_run_folder(run, epochs=2, steps_per_epoch=4)   # 72 images // (8 x 2 workers)
    assert rows[0]["images_per_s"] > 0
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1   # rank 0 alone writes events
    capsys.readouterr()

    assert main(["train", str(job), "--set", "schedule.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "checkpoint_epoch_0001" in out
    resumed = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in resumed] == [0, 1, 2] and resumed[:2] == rows

    # a corrupt latest checkpoint (Ray hands it back too): the workers fall back to the one before
    latest = run / "checkpoint_epoch_0002" / "checkpoint.pt"
    latest.write_bytes(b"not a checkpoint")
    assert main(["train", str(job), "--set", "schedule.epochs=4"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "from checkpoint_epoch_0001/checkpoint.pt (epoch 2 of 4 done" in out
    assert [r["epoch"] for r in pq.read_table(run / "metrics.parquet").to_pylist()] == [0, 1, 2, 3]


@pytest.mark.ray
def test_two_ray_workers_stop_together_on_divergence_naming_the_step(ray_session, tmp_path, write_job):
    """Without a per-step collective: the ranks check the loss at the same steps, so both stop there."""
    job = write_job(tiny_job(tmp_path / "runs", "diverge2", optim={"base_lr": 1.0e30},
                             schedule={"epochs": 2, "warmup_epochs": 0}))
    assert main(["train", str(job)]) == 1
    run = tmp_path / "runs" / "diverge2"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and re.search(r"at epoch 0, step [0-3] ", summary["message"])
    assert not (run / "metrics.parquet").exists() and not list(run.glob("checkpoint_*"))


@pytest.mark.ray
def test_three_bad_images_are_all_named_in_one_exit_2_before_any_worker_starts(ray_session, tmp_path, write_job, capsys):
    from test_data import make_folder

    root = make_folder(tmp_path / "pics", classes=("cat", "dog"), per_class=8, size=16, splits=("train", "val"))
    (root / "val" / "dog" / "bad.png").write_bytes(b"not a png")
    (root / "train" / "dog" / "empty.jpg").write_bytes(b"")
    (root / "train" / "cat" / "cut.png").write_bytes((root / "train" / "cat" / "0.png").read_bytes()[:60])
    job = write_job(tiny_job(tmp_path / "runs", "badimage", data={"source": f"imagefolder:{root}", "classes": None,
                                                                   "max_per_class": None},
                             run={"storage": str(tmp_path / "runs"), "max_failures": 2}))
    assert main(["train", str(job)]) == 2
    captured = capsys.readouterr()
    assert "3 of 35 image files cannot be read" in captured.err and "Traceback" not in captured.err
    for name in ("val/dog/bad.png: not an image", "train/dog/empty.jpg: empty file", "train/cat/cut.png: damaged"):
        assert name in captured.err
    assert "weights: none" not in captured.out                 # no worker started
    written = [p.name for p in (tmp_path / "runs" / "badimage").rglob("*")] if (tmp_path / "runs" / "badimage").exists() else []
    assert written == []                                       # the run never started: its folder holds nothing


def test_diverging_run_stops_naming_epoch_and_step(tmp_path, write_job, capsys):
    job = write_job(tiny_job(tmp_path / "runs", "diverge", optim={"base_lr": 1.0e6, "base_batch_size": 8},
                             schedule={"epochs": 2, "warmup_epochs": 0}))
    assert main(["train", str(job), "--local"]) == 1
    err = capsys.readouterr().err
    assert "loss diverged" in err and "at epoch" in err and "step" in err
    run = tmp_path / "runs" / "diverge"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "at epoch 0, step" in summary["message"]
    assert summary["epochs_completed"] == 0
    # it diverged inside epoch 0: no metric row, checkpoint or weights was written as if it were good
    assert not (run / "metrics.parquet").exists() and not list(run.glob("checkpoint_*"))
    assert not (run / "model.safetensors").exists()
