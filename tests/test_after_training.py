"""Issue 14: after training: runs, report, TensorBoard, export (folded BN), evaluate, predict."""

import json
import os
import re
import shutil
import socket
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_job
from PIL import Image

from orchestrator.after.fold import fold_batchnorm
from orchestrator.after.report import lr_by_step
from orchestrator.after.trained import load_trained, read_run_spec
from orchestrator.cli import main
from orchestrator.data.loaders import make_dataset
from orchestrator.data.sources import load_splits
from orchestrator.train.models import build_architecture


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished --local run: 3 digit classes at 16 px, 5 epochs (test acc@1 about 0.99 here)."""
    import yaml

    root = tmp_path_factory.mktemp("after")
    job = tiny_job(root / "runs", "digits", data={"max_per_class": 60}, schedule={"epochs": 5, "warmup_epochs": 0.5},
                   optim={"base_lr": 0.05}, scaling={"num_workers": 1, "per_worker_batch_size": 16})
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path), "--local"]) == 0
    return root / "runs" / "digits"


def summary_of(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_runs_lists_a_run_with_status_epochs_and_accuracy(run, capsys):
    capsys.readouterr()
    assert main(["runs", str(run.parent), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in rows if r["name"] == "digits")
    summary = summary_of(run)
    assert row["kind"] == "run" and row["status"] == "completed"
    assert (row["epochs_completed"], row["epochs"]) == (5, 5)
    assert row["test_acc1"] == summary["test_acc1"] and row["best_val_acc1"] == summary["best_val_acc1"]
    assert row["wall_s"] > 0 and re.match(r"\d{4}-\d\d-\d\dT", row["updated_at"])
    assert main(["runs", str(run.parent)]) == 0
    assert "digits" in capsys.readouterr().out


def copy_run(run, tmp_path, name):
    target = tmp_path / "runs" / name
    shutil.copytree(run, target)
    return target


def test_runs_tells_running_diverged_and_killed_runs_apart(run, tmp_path, capsys):
    running = copy_run(run, tmp_path, "running")
    now = time.time()
    (running / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": "test",
                                                  "started_at": now, "heartbeat_at": now, "token": "x"}))
    diverged = copy_run(run, tmp_path, "diverged")
    (diverged / "summary.json").write_text(json.dumps({**summary_of(run), "status": "diverged"}))
    killed = copy_run(run, tmp_path, "killed")      # died without a word: no summary, no live lock
    (killed / "summary.json").unlink()
    (tmp_path / "runs" / "not_a_run").mkdir()
    capsys.readouterr()
    assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
    status = {r["name"]: r["status"] for r in json.loads(capsys.readouterr().out)}
    assert status == {"running": "running", "diverged": "diverged", "killed": "interrupted"}


def test_runs_of_a_missing_storage_is_exit_2(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert "no such storage folder" in capsys.readouterr().err


def test_report_writes_plots_and_a_page_that_embeds_them(run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["accuracy.png", "index.html", "loss.png", "lr.png", "throughput.png"]
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            assert image.size[0] > 300
    page = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http" not in text and "//" not in text and "url(" not in text      # nothing external
    assert "<link" not in page and "<script" not in page and "href" not in page
    assert main(["report", str(run)]) == 0                      # default: the run folder's report/
    assert (run / "report" / "index.html").is_file()


def test_the_reports_lr_curve_is_the_lr_the_run_applied(run):
    """The plotted LR comes from plan and schedule; at every epoch's last step it equals the LR recorded."""
    from orchestrator.config.plan import Plan

    spec = read_run_spec(load_trained(str(run)).folder)
    plan = Plan.from_dict(json.loads((run / "plan.json").read_text()))
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    curves = lr_by_step(spec, plan, rows)
    assert all(len(curve) == plan.total_steps for curve in curves.values())
    for row in rows:
        for name, curve in curves.items():
            assert curve[row["step"] - 1] == pytest.approx(row[f"lr/{name}"], rel=1e-9)
    first = curves["rest"]
    assert first[0] < first[plan.warmup_steps - 1] and first[-1] < first[plan.warmup_steps]   # warmup, then decay


def test_tensorboard_has_loss_and_lr_per_step_and_metrics_per_epoch(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    plan = json.loads((run / "plan.json").read_text())
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    lr_tags = [t for t in tags if t.startswith("lr/")]
    assert len(lr_tags) == len(plan["param_groups"])
    assert [e.step for e in events.Scalars(lr_tags[0])] == list(range(1, plan["total_steps"] + 1))
    losses = {e.step for e in events.Scalars("step/train_loss_rank0")}     # as often as the progress line reads it
    per_epoch = plan["steps_per_epoch"]
    assert {1, per_epoch, per_epoch + 1, plan["total_steps"]} <= losses <= set(range(1, plan["total_steps"] + 1))
    assert [e.value for e in events.Scalars("epoch/val_acc1")] == pytest.approx([r["val_acc1"] for r in rows])
    assert [e.step for e in events.Scalars("epoch/val_acc1")] == [r["step"] for r in rows]


def test_fold_batchnorm_folds_every_pair_and_keeps_the_outputs():
    model = build_architecture("resnet18", 4, 32)
    with torch.no_grad():                     # BN statistics far from the identity, so a wrong fold shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
    model.eval()
    folded, pairs = fold_batchnorm(model)
    assert pairs == 20 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-4)


def test_evaluate_reproduces_the_summarys_test_accuracy(run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = summary_of(run)
    assert set(result) == {"acc1", "acc5", "balanced_acc", "macro_f1", "per_class", "images"}
    assert result["balanced_acc"] == pytest.approx(summary["test_balanced_acc"])   # the loop's and evaluate's agree
    assert result["macro_f1"] == pytest.approx(summary["test_macro_f1"])
    assert result["acc1"] == summary["test_acc1"] and result["acc5"] == summary["test_acc5"]
    assert result["images"] == summary["test_images"] and set(result["per_class"]) == {"0", "1", "2"}
    assert (tmp_path / "confusion_test.png").is_file()
    assert main(["evaluate", str(run), "--split", "val", "--json", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["acc1"] == summary["best_val_acc1"]


def digit_images(run, tmp_path, count=12) -> tuple[list[str], list[str]]:
    """The run's first test digits as PNG files, and their classes."""
    spec = read_run_spec(load_trained(str(run)).folder)
    splits = load_splits(spec.data, spec.seed)
    paths = []
    for i in range(count):
        path = tmp_path / f"digit_{i}.png"
        Image.fromarray(splits.test.items[i]).save(path)
        paths.append(str(path))
    return paths, [splits.class_names[label] for label in splits.test.labels[:count]]


def test_predict_names_the_class_of_digit_images(run, tmp_path, capsys):
    paths, truth = digit_images(run, tmp_path)
    capsys.readouterr()
    assert main(["predict", str(run), *paths, "--top-k", "2", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in predictions] == paths
    assert all(len(p["top"]) == 2 and set(p["top"][0]) == {"class", "prob"} for p in predictions)
    assert all(p["top"][0]["prob"] >= p["top"][1]["prob"] for p in predictions)
    named = [p["top"][0]["class"] for p in predictions]
    assert sum(a == b for a, b in zip(named, truth)) >= 10, (named, truth)


def test_export_onnx_folded_predicts_as_the_run_does(run, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx", "--fold-bn", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "folded 20 conv+BN pairs" in printed and "max abs logit difference" in printed
    assert re.search(r"│\s+1 │.*x │", printed) and re.search(r"│\s+32 │.*x │", printed)   # speed at batch 1 and 32
    assert "onnxruntime checked" in printed
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["folded"] == "true" and json.loads(meta["classes"]) == ["0", "1", "2"]
    trained = load_trained(str(run))
    spec = trained.spec
    test = make_dataset(load_splits(spec.data, spec.seed).test, spec.data, False, "test")
    images = torch.stack([test[i][0] for i in range(len(test))])
    onnx_logits = session.run(None, {"images": images.numpy()})[0]
    assert (onnx_logits.argmax(1) == trained.logits(images).numpy().argmax(1)).all()
    # and evaluate/predict read the exported file as they read the run
    paths, _ = digit_images(run, tmp_path, 4)
    assert main(["predict", str(out), *paths, "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["predict", str(run), *paths, "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert [p["top"][0]["class"] for p in from_file] == [p["top"][0]["class"] for p in from_run]


@pytest.mark.parametrize("fmt", ["safetensors", "pt2"])
def test_export_safetensors_and_pt2_load_back_with_the_same_outputs(run, tmp_path, capsys, fmt):
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(run), "--format", fmt, "--fold-bn", "--out", str(out)]) == 0
    trained = load_trained(str(run))
    x = torch.randn(3, 3, 16, 16)
    if fmt == "pt2":
        loaded = torch.export.load(str(out)).module()
        with torch.no_grad():
            other = loaded(x)
    else:
        other = load_trained(str(out)).logits(x)
    assert torch.allclose(trained.logits(x), other, atol=1e-4)


def test_export_without_a_destination_writes_into_the_run_folder(run, capsys):
    assert main(["export", str(run), "--format", "safetensors"]) == 0
    assert (run / "export" / "digits.safetensors").is_file()


def test_bad_input_is_one_line_exit_2_and_writes_nothing(run, tmp_path, capsys):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    for command in (["report", str(not_a_run)], ["evaluate", str(not_a_run)], ["export", str(not_a_run)],
                    ["predict", str(not_a_run), "x.png"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert str(not_a_run) in err and "Traceback" not in err, command
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err

    started = copy_run(run, tmp_path, "no_weights")      # started, no epoch finished: no weights yet
    for path in [*started.glob("checkpoint_*"), started / "model.safetensors"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    before = sorted(p.name for p in started.rglob("*"))
    for command in (["export", str(started)], ["evaluate", str(started)], ["predict", str(started), "x.png"]):
        assert main(command) == 2
        assert "has no weights yet" in capsys.readouterr().err
    assert sorted(p.name for p in started.rglob("*")) == before

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    good, _ = digit_images(run, tmp_path, 1)
    assert main(["predict", str(run), *good, str(bad), "--json"]) == 2
    captured = capsys.readouterr()
    assert "cannot read image" in captured.err and str(bad) in captured.err and captured.out == ""

    with pytest.raises(SystemExit) as exit_info:           # argparse: exit 2, naming the choices
        main(["export", str(run), "--format", "tflite"])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert not (tmp_path / "out.tflite").exists()

    assert main(["evaluate", str(run), "--data", "builtin:digits", "--split", "test", "--json",
                 "--out", str(tmp_path)]) == 0               # the same data named explicitly: fine
    capsys.readouterr()


def test_a_run_that_fails_after_starting_says_failed_in_its_summary(tmp_path, write_job, capsys, monkeypatch):
    from test_data import make_folder

    from orchestrator.data import image_check

    root = make_folder(tmp_path / "pics", classes=("cat", "dog"), per_class=8, size=16, splits=("train", "val"))
    (root / "val" / "dog" / "bad.png").write_bytes(b"not a png")
    monkeypatch.setattr(image_check, "check_images", lambda paths: {})   # it broke after the check read it
    job = write_job(tiny_job(tmp_path / "runs", "badval", data={"source": f"imagefolder:{root}", "classes": None,
                                                                 "max_per_class": None},
                             scaling={"num_workers": 1, "per_worker_batch_size": 8}))
    assert main(["train", str(job), "--local"]) == 2
    summary = summary_of(tmp_path / "runs" / "badval")
    assert summary["status"] == "failed" and "bad.png" in summary["message"]
    capsys.readouterr()
    assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "failed"


def test_confusion_matrix_counts_rows_by_true_class(run):
    from orchestrator.after.evaluation import evaluate_split

    result = evaluate_split(load_trained(str(run)))
    assert result.confusion.sum() == result.images
    labels = load_splits(read_run_spec(load_trained(str(run)).folder).data, 0).test.labels
    assert result.confusion.sum(axis=1).tolist() == np.bincount(labels, minlength=3).tolist()
    assert result.acc1 == pytest.approx(np.trace(result.confusion) / result.images)


def test_event_files_reach_object_storage_at_every_epoch_and_a_resume_purges_the_lost_steps(tmp_path):
    """EventLog on a filesystem that is not local disk (a pyarrow SubTreeFileSystem standing in for S3:
    the same RunFolder.write_bytes path): files are staged locally and copied out at each epoch's end."""
    import pyarrow.fs as pafs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from orchestrator.store.storage import RunFolder
    from orchestrator.train.eventlog import EventLog

    (tmp_path / "bucket").mkdir()
    folder = RunFolder(str(tmp_path / "bucket"), "run")
    folder.fs, folder.root = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem()), "run"
    assert not folder.is_local
    first = EventLog(folder, 0)
    for step in range(6):                                  # epoch 0 = steps 0-2, then 3 steps of epoch 1
        first.step(step, 1.0, {"rest": 0.1})
        if step == 2:
            first.epoch({"step": 3, "val_acc1": 0.5})
            assert list((tmp_path / "bucket" / "run" / "tensorboard").glob("events.out.tfevents.*"))
    first.writer.flush()
    first._copy_out()                                      # killed in epoch 1: steps 4-6 were logged
    resumed = EventLog(folder, 3)                          # resumed from the checkpoint after step 3
    for step in range(3, 6):
        resumed.step(step, 2.0, {"rest": 0.1})
    resumed.epoch({"step": 6, "val_acc1": 0.75})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "bucket" / "run" / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("step/train_loss_rank0")]
    assert losses == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)]   # the lost attempt's 4-6 purged
    assert [(e.step, e.value) for e in events.Scalars("epoch/val_acc1")] == [(3, 0.5), (6, 0.75)]
