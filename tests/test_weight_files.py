"""Issue 22.1: weights files written by the tools people fine-tune from load by content, their EMA
weights are taken when present, and what weights_only=True refuses is named with a way out."""

import argparse
import pathlib

import numpy
import pytest
import torch
from conftest import tiny_job
from torch.optim.swa_utils import AveragedModel

from orchestrator.cli import main
from orchestrator.config.errors import SpecError
from orchestrator.config.jobfile import validate_spec
from orchestrator.config.spec import ModelSpec
from orchestrator.train.models import build_architecture, build_model
from orchestrator.train.weight_files import WeightsError, read_weights
from orchestrator.train.weights import check_references


def resnet18(num_classes: int = 3, conv1_value: float | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_architecture("resnet18", num_classes, 32)
    if conv1_value is not None:
        with torch.no_grad():
            model.conv1.weight.fill_(conv1_value)
    return model


def torchvision_reference_checkpoint(path: pathlib.Path) -> pathlib.Path:
    """What torchvision's references/classification/train.py passes to utils.save_on_master (= torch.save)
    with --model-ema: its ExponentialMovingAverage is an AveragedModel, saved with `module.` keys and n_averaged."""
    model = resnet18(conv1_value=1.0)
    model_ema = AveragedModel(resnet18(conv1_value=2.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 30)
    args = argparse.Namespace(data_path=pathlib.PosixPath("/datasets/imagenet"), model="resnet18", lr=0.1,
                              epochs=90, model_ema=True, clip_grad_norm=None, best_acc=numpy.float64(0.5))
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "lr_scheduler": scheduler.state_dict(), "epoch": 0, "args": args,
                  "model_ema": model_ema.state_dict()}
    torch.save(checkpoint, path)
    return path


def timm_checkpoint(folder: pathlib.Path) -> pathlib.Path:
    """timm's own CheckpointSaver, with a ModelEmaV3 and the argparse args its train.py passes."""
    import timm
    from timm.utils import CheckpointSaver, ModelEmaV3

    model = timm.create_model("resnet18", num_classes=3)
    ema = ModelEmaV3(model)
    with torch.no_grad():
        model.conv1.weight.fill_(1.0)
        ema.module.conv1.weight.fill_(2.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    folder.mkdir()
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(model="resnet18", lr=0.1), model_ema=ema,
                            checkpoint_dir=str(folder), recovery_dir=str(folder))
    saver.save_checkpoint(0, metric=0.5)
    return folder / "model_best.pth.tar"


def lightning_checkpoint(folder: pathlib.Path) -> pathlib.Path:
    """Lightning's ModelCheckpoint after one real training step of a module holding the net as `self.model`."""
    lightning = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class Classifier(lightning.LightningModule):
        def __init__(self, lr: float = 0.01):
            super().__init__()
            self.save_hyperparameters()
            self.model = resnet18()

        def training_step(self, batch, _):
            images, labels = batch
            return torch.nn.functional.cross_entropy(self.model(images), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])), batch_size=2)
    saver = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=str(folder), filename="last")
    trainer = lightning.Trainer(max_steps=1, callbacks=[saver], logger=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", default_root_dir=str(folder))
    trainer.fit(Classifier(), data)
    return folder / "last.ckpt"


WRITERS = {"torchvision": lambda tmp: torchvision_reference_checkpoint(tmp / "checkpoint.pth"),
           "timm": lambda tmp: timm_checkpoint(tmp / "timm"),
           "lightning": lambda tmp: lightning_checkpoint(tmp / "lightning")}


@pytest.mark.parametrize("tool, note", [
    ("torchvision", "took the EMA weights under 'model_ema'; model.weights_ema: false takes 'model'"),
    ("timm", "took the EMA weights under 'state_dict_ema'; model.weights_ema: false takes 'state_dict'"),
    ("lightning", "took the state dict under 'state_dict'"),
])
def test_checkpoints_of_other_tools_load_with_their_ema(tmp_path, tool, note):
    path = WRITERS[tool](tmp_path)
    report = build_model(ModelSpec(arch="resnet18", weights=str(path)), 5, 32).report
    assert len(report.loaded) == 120 and report.unexpected == [] and note in report.notes
    if tool != "lightning":
        ema = build_model(ModelSpec(arch="resnet18", weights=str(path)), 5, 32).model
        raw = build_model(ModelSpec(arch="resnet18", weights=str(path), weights_ema=False), 5, 32).model
        assert torch.all(ema.conv1.weight == 2.0) and torch.all(raw.conv1.weight == 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["torchvision", "timm", "lightning"])
def test_train_fine_tunes_from_other_tools_checkpoints(tmp_path, write_job, capsys, tool):
    path = WRITERS[tool](tmp_path)
    job = tiny_job(tmp_path / "runs", tool, model={"arch": "resnet18", "weights": str(path)},
                   optim={"base_lr": 0.01}, schedule={"epochs": 1, "warmup_epochs": 0}, scaling={"num_workers": 1})
    job_file = write_job(job)
    assert main(["validate", str(job_file)]) == 0
    assert main(["train", str(job_file), "--local"]) == 0
    out = capsys.readouterr().out
    assert f"weights {path}: loaded 120 tensors" in out
    assert ("took the EMA weights" in out) == (tool != "lightning")


def test_ema_true_requires_ema_weights(tmp_path):
    path = lightning_checkpoint(tmp_path / "lightning")
    with pytest.raises(WeightsError, match=r"model.weights_ema: .*last.ckpt holds no EMA weights .*its keys: epoch"):
        read_weights(path, str(path), ema=True)


def test_files_are_read_by_content_not_name(tmp_path):
    torch.save(resnet18().state_dict(), tmp_path / "weights")           # no suffix at all
    (tmp_path / "notes.pth").write_text("these are not weights")
    assert len(read_weights(tmp_path / "weights", "w").state_dict) == 122
    with pytest.raises(WeightsError, match="notes.pth is not a weights file"):
        read_weights(tmp_path / "notes.pth", "notes.pth")


class Unknown:
    pass


@pytest.mark.parametrize("legacy", [False, True])
def test_an_unknown_global_is_named_with_why_and_how_to_resave(tmp_path, legacy):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": resnet18().state_dict(), "extra": Unknown()}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(WeightsError) as caught:
        read_weights(path, str(path))
    message = str(caught.value)
    assert "test_weight_files.Unknown" in message and "could run code" in message
    assert "torch.load(" in message and "weights_only=False" in message and "\x1b" not in message


def test_validate_and_train_refuse_the_same_file(tmp_path, write_job, capsys):
    path = tmp_path / "w.pth.tar"
    torch.save({"state_dict": resnet18().state_dict(), "extra": Unknown()}, path)
    job = tiny_job(tmp_path / "runs", "refused", model={"arch": "resnet18", "weights": str(path)},
                   scaling={"num_workers": 1})
    with pytest.raises(SpecError, match="Unknown"):
        check_references(validate_spec(job))
    job_file = write_job(job)
    assert main(["validate", str(job_file)]) == 2
    validate_err = capsys.readouterr().err
    assert main(["train", str(job_file), "--local"]) == 2
    assert capsys.readouterr().err == validate_err and "\x1b" not in validate_err
