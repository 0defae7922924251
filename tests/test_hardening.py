"""Issue 10: bad input gets one clear line and exit 2, and loses nothing. Each case here failed before."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.cli import main
from orchestrator.data import DataError, ImageReadError, load_splits, make_dataset
from orchestrator.models import build_architecture
from orchestrator.spec import DataSpec
from orchestrator.storage import strict_json
from orchestrator.weights import WeightsError, load_matching

from conftest import tiny_job
from test_data import make_folder


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
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)     # 32 x 32 = 1024 pixels: over twice the limit
    splits = load_splits(DataSpec(source=f"imagefolder:{root}", image_size=16), seed=0)
    with pytest.raises(ImageReadError, match=r"too large to decode safely.*decompression bomb"):
        make_dataset(splits.train, DataSpec(image_size=16), False, "train")[0]


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
