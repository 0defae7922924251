"""Issue 10: bad input gets one clear line and exit 2, and loses nothing. Each case here failed before."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, tiny_job
from PIL import Image
from test_data import make_folder

from orchestrator.cli import main
from orchestrator.config.spec import DataSpec
from orchestrator.data.decode import ImageReadError
from orchestrator.data.loaders import make_dataset
from orchestrator.data.sources import load_splits
from orchestrator.data.splits import DataError
from orchestrator.store.storage import strict_json
from orchestrator.train.models import build_architecture
from orchestrator.train.weights import WeightsError, load_matching


def strict_load(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers (JavaScript, Go, jq) do."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def local_job(tmp_path, name: str, **sections) -> dict:
    return tiny_job(tmp_path / "runs", name, scaling={"num_workers": 1, "per_worker_batch_size": 8}, **sections)


def resnet_weights(tmp_path, edit) -> str:
    """A resnet18 state_dict file, changed by `edit(state)`."""
    state = build_architecture("resnet18", 3, 16).state_dict()
    edit(state)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    return str(path)


# 7: a non-finite validation loss is divergence; every JSON written is strict

def test_strict_json_writes_null_for_nan_and_infinity():
    assert strict_load(strict_json({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})) == \
        {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_nan_validation_loss_stops_the_run_as_diverged(tmp_path, write_job, capsys):
    def negative_running_variance(state):   # training normalises with batch statistics; evaluation takes sqrt(-1e6)
        for key in state:
            if key.endswith("running_var"):
                state[key].fill_(-1.0e6)

    weights = resnet_weights(tmp_path, negative_running_variance)
    job = write_job(local_job(tmp_path, "nanval", model={"arch": "resnet18", "weights": weights}))
    assert main(["train", str(job), "--local"]) == 1
    err = capsys.readouterr().err
    assert "validation loss diverged (nan) at epoch 0" in err
    assert "no epoch finished, so no checkpoint was written" in err       # not "the last good checkpoint is kept"
    run = tmp_path / "runs" / "nanval"
    summary = strict_load((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epochs_completed"] == 0
    assert not list(run.glob("checkpoint_*")) and not (run / "model.safetensors").exists()


# 12: weights that are not what they seem

def test_integer_and_bool_tensors_never_load_into_float_parameters():
    model = build_architecture("resnet18", 3, 16)
    state = model.state_dict()
    state["conv1.weight"] = torch.ones_like(state["conv1.weight"], dtype=torch.int64)
    state["bn1.weight"] = torch.ones_like(state["bn1.weight"], dtype=torch.bool)
    before = model.conv1.weight.detach().clone()
    report = load_matching(model, state, "w.pt")
    assert {name for name, _, _ in report.skipped_dtype} == {"conv1.weight", "bn1.weight"}
    assert "conv1.weight" not in report.loaded and "bn1.num_batches_tracked" in report.loaded   # int64 into int64 is fine
    assert torch.equal(model.conv1.weight, before)
    assert "skipped 2 for dtype" in report.lines()[0]
    assert any("conv1.weight: weights hold int64, the model float32" in line for line in report.lines())


def test_nan_weights_are_refused_naming_the_tensor(tmp_path, write_job, capsys):
    weights = resnet_weights(tmp_path, lambda state: state["layer1.0.conv1.weight"].view(-1)[0].fill_(math.nan))
    job = write_job(local_job(tmp_path, "nanweights", model={"arch": "resnet18", "weights": weights}))
    assert main(["train", str(job), "--local"]) == 2
    err = capsys.readouterr().err
    assert "holds NaN or infinite values in 1 tensors (layer1.0.conv1.weight)" in err
    with pytest.raises(WeightsError):
        load_matching(build_architecture("resnet18", 3, 16), torch.load(weights, weights_only=True), weights)


# 11: data that would train the wrong thing silently

def test_an_image_over_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "pics", size=32)
    spec = DataSpec(source=f"imagefolder:{root}", image_size=16)
    splits = load_splits(spec, seed=0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)     # 32 x 32 = 1024 pixels: over twice the limit
    with pytest.raises(ImageReadError, match=r"too large to decode safely.*decompression bomb"):
        make_dataset(splits.train, DataSpec(image_size=16), False, "train")[0]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))     # the check's cached answers predate the limit
    with pytest.raises(DataError, match=r"12 of 12 image files cannot be read(.|\n)*0.png: too large to decode safely"):
        load_splits(spec, seed=0)                                         # checked up front too


def test_an_empty_class_folder_is_an_error_not_a_smaller_head(tmp_path):
    root = make_folder(tmp_path / "pics", classes=("cat", "dog", "eel"))
    for image in (root / "train" / "eel").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"train/eel hold no images"):
        load_splits(DataSpec(source=f"imagefolder:{root}"), seed=0)


def test_one_class_is_refused(tmp_path, write_job, capsys):
    root = make_folder(tmp_path / "pics", classes=("cat",))
    job = write_job(local_job(tmp_path, "oneclass", data={"source": f"imagefolder:{root}", "classes": None,
                                                           "max_per_class": None}))
    assert main(["train", str(job), "--local"]) == 2
    assert "has one class (cat); a classifier needs at least two" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "oneclass").exists()


def test_a_class_absent_from_val_or_test_is_warned_about(tmp_path):
    root = make_folder(tmp_path / "pics", classes=("cat", "dog", "eel"), splits=("train", "val", "test"))
    for image in (root / "val" / "eel").iterdir():
        image.unlink()
    (root / "test" / "eel").rename(tmp_path / "elsewhere")
    splits = load_splits(DataSpec(source=f"imagefolder:{root}"), seed=0)
    assert splits.class_names == ["cat", "dog", "eel"]
    assert any("the val split has no images of class(es) eel" in note for note in splits.notes)
    assert any("the test split has no images of class(es) eel" in note for note in splits.notes)


def test_archive_leftovers_and_hidden_folders_are_not_classes(tmp_path):
    root = make_folder(tmp_path / "pics", splits=("train", "val"))
    for junk in ("__MACOSX", ".ipynb_checkpoints"):
        for split in ("train", "val"):
            (root / split / junk / "cat").mkdir(parents=True)
            (root / split / junk / "cat" / "._0.png").write_bytes(b"AppleDouble, not an image")
    (root / "train" / "cat" / "._0.png").write_bytes(b"AppleDouble, not an image")
    splits = load_splits(DataSpec(source=f"imagefolder:{root}"), seed=0)
    assert splits.class_names == ["cat", "dog"]
    assert len(splits.train) == 12 and not any("._" in path for path in splits.train.items)
    assert any("ignored folders" in note and "__MACOSX" in note for note in splits.notes)
    assert np.bincount(splits.val.labels).tolist() == [6, 6]


# 3: one writer per run folder

def write_lock(run_dir, **holder):
    import socket
    import time

    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    fields = {"host": socket.gethostname(), "pid": os.getpid(), "command": "orchestrator train", "started_at": now,
              "heartbeat_at": now, "token": "t" * 32, **holder}
    (run_dir / "run.lock").write_text(json.dumps(fields))


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_second_run_on_a_held_run_folder_exits_2_naming_the_holder(tmp_path, write_job, capsys):
    job = write_job(local_job(tmp_path, "busy"))
    write_lock(tmp_path / "runs" / "busy")                  # held by this live process
    assert main(["train", str(job), "--local"]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another run: pid {os.getpid()} on" in err
    assert sorted(p.name for p in (tmp_path / "runs" / "busy").iterdir()) == ["run.lock"]   # nothing else written
    sweep = local_job(tmp_path, "busy")
    sweep["sweep"] = {"space": {"optim.base_lr": {"grid": [0.1, 0.01]}}}
    assert main(["sweep", str(write_job(sweep, "sweep.yaml"))]) == 2      # a sweep of the same name too
    assert "is in use by another run" in capsys.readouterr().err


@pytest.mark.parametrize("holder, reason", [
    ({"pid": None}, "on this host is gone"),
    ({"host": "another-host", "heartbeat_at": 0.0}, "last heartbeat is"),
])
def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, write_job, capsys, holder, reason):
    job = write_job(local_job(tmp_path, "stale", schedule={"epochs": 1}))
    write_lock(tmp_path / "runs" / "stale", **{k: (dead_pid() if v is None else v) for k, v in holder.items()})
    assert main(["train", str(job), "--local"]) == 0
    out = capsys.readouterr().out
    assert "took over the lock of pid" in out and reason in out
    assert not (tmp_path / "runs" / "stale" / "run.lock").exists()   # released at the end


def test_a_live_lease_from_another_host_is_respected(tmp_path, write_job, capsys):
    job = write_job(local_job(tmp_path, "leased"))
    write_lock(tmp_path / "runs" / "leased", host="another-host", pid=1)
    assert main(["train", str(job), "--local"]) == 2
    assert "pid 1 on another-host" in capsys.readouterr().err


# 4: nothing in the run folder changes until the run is known to start

def test_a_rerun_that_fails_its_checks_changes_nothing(tmp_path, write_job, capsys):
    job = write_job(local_job(tmp_path, "keep", schedule={"epochs": 1}))
    assert main(["train", str(job), "--local"]) == 0
    run = tmp_path / "runs" / "keep"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other_arch = tmp_path / "squeezenet.pt"                  # exists, but fits nothing of a resnet34
    torch.save(build_architecture("squeezenet1_0", 3, 64).state_dict(), other_arch)
    assert main(["train", str(job), "--local", "--set", "model.arch=resnet34", "--set", f"model.weights={other_arch}",
                 "--set", "schedule.epochs=2"]) == 2
    assert "only 0 of the backbone's" in capsys.readouterr().err
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


# 5: storage errors are one line, and leave no temporary files

def test_a_storage_path_that_is_a_file_is_one_line_and_exit_2(tmp_path, write_job, capsys):
    (tmp_path / "runs").write_text("not a folder")
    job = write_job(local_job(tmp_path, "onfile"))
    assert main(["train", str(job), "--local"]) == 2
    err = capsys.readouterr().err
    assert "run.storage: cannot create the run folder" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(tmp_path, write_job):
    """RLIMIT_FSIZE makes writes over 4 MB fail as a full disk does (Python ignores SIGXFSZ): the
    spec and plan are written, the first checkpoint (~45 MB) is not."""
    import resource

    job = write_job(local_job(tmp_path, "full", schedule={"epochs": 1}))
    limit = 4 * 2**20
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(job), "--local"], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "cannot write" in result.stderr and "File too large" in result.stderr and "Traceback" not in result.stderr
    run = tmp_path / "runs" / "full"
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]
    assert not (run / "run.lock").exists()


def test_temporary_files_of_a_dead_write_are_swept_on_the_next_start(tmp_path, write_job, capsys):
    run = tmp_path / "runs" / "sweepme"
    (run / "checkpoint_epoch_0000").mkdir(parents=True)
    (run / "checkpoint_epoch_0000" / "checkpoint.pt.tmp-0a1b2c3d").write_bytes(b"half a checkpoint")
    job = write_job(local_job(tmp_path, "sweepme", schedule={"epochs": 1}))
    assert main(["train", str(job), "--local"]) == 0
    assert "removed 1 temporary file(s) left by an interrupted write" in capsys.readouterr().out
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name]


# 6: a corrupt latest checkpoint costs an epoch, not the run

def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, write_job, capsys):
    job = write_job(local_job(tmp_path, "corrupt", schedule={"epochs": 2}))
    assert main(["train", str(job), "--local"]) == 0
    latest = tmp_path / "runs" / "corrupt" / "checkpoint_epoch_0001" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[: len(latest.read_bytes()) // 2])     # a write cut short
    capsys.readouterr()
    assert main(["train", str(job), "--local", "--set", "schedule.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "checkpoint_epoch_0001/checkpoint.pt" in out
    assert "from checkpoint_epoch_0000/checkpoint.pt (epoch 1 of 3 done" in out
    rows = pq.read_table(tmp_path / "runs" / "corrupt" / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [0, 1, 2]


# 9: a sweep checks the job's data and weights once, before any trial

@pytest.mark.parametrize("sections, expected", [
    ({"data": {"source": "imagefolder:/nonexistent/pics"}}, "image folder /nonexistent/pics does not exist"),
    ({"model": {"arch": "resnet18", "weights": "SQUEEZE"}}, "only 0 of the backbone's"),
])
def test_a_sweep_with_bad_data_or_weights_exits_2_before_any_trial(tmp_path, write_job, capsys, sections, expected):
    if sections.get("model"):
        path = tmp_path / "squeezenet.pt"
        torch.save(build_architecture("squeezenet1_0", 3, 64).state_dict(), path)
        sections["model"]["weights"] = str(path)
    job = local_job(tmp_path, "badsweep", **sections)
    job["sweep"] = {"space": {"optim.base_lr": {"grid": [0.1, 0.01]}}}
    assert main(["sweep", str(write_job(job))]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "badsweep").exists()


# 13: SIGTERM is handled as Ctrl-C is

def test_sigterm_stops_a_run_keeping_its_checkpoints_and_says_how_to_resume(tmp_path, write_job):
    job = write_job(local_job(tmp_path, "term", schedule={"epochs": 30}))
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(job), "--local"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "term"
    deadline = time.time() + 120
    while time.time() < deadline and not list(run.glob("checkpoint_epoch_*/checkpoint.pt")):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-2000:]
    assert "interrupted" in err and "re-run the same command to resume" in err and "Traceback" not in err
    assert not (run / "run.lock").exists() and list(run.glob("checkpoint_epoch_*/checkpoint.pt"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["message"]
