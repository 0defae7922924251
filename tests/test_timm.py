"""Issue 25, item 1: `model.arch: timm/<name>`, built without downloads, trained, exported, read back."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_job
from safetensors.torch import save_file

from orchestrator.cli import main
from orchestrator.config.catalog import timm_arch_names
from orchestrator.config.spec import ModelSpec
from orchestrator.train.models import build_model

FAMILIES = ["timm/test_resnet", "timm/test_convnext", "timm/test_efficientnet", "timm/test_vit",
            "timm/mobilenetv4_conv_small", "timm/regnetx_002"]


def timm_job(tmp_path, name, arch, **sections):
    job = tiny_job(tmp_path / "runs", name, model={"arch": arch, **sections.pop("model", {})},
                   scaling={"num_workers": 1, "per_worker_batch_size": 8},
                   schedule={"epochs": 1, "warmup_epochs": 0}, **sections)
    job["data"]["image_size"] = 32
    return job


@pytest.mark.parametrize("arch, head", [("timm/test_resnet", ("fc",)), ("timm/test_convnext", ("head.fc",)),
                                        ("timm/test_vit", ("head",)), ("timm/mobilenetv4_conv_small", ("classifier",))])
def test_the_head_is_timms_classifier_and_backbone_freezes_the_rest(arch, head):
    built = build_model(ModelSpec(arch=arch, freeze=["backbone"]), 5, 32)
    assert built.head == head
    trainable = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.split(".")[0] == head[0].split(".")[0] for n in trainable)
    assert built.model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)      # a ViT built for the job's image size


def test_validate_knows_timms_names_from_its_list_without_importing_timm(tmp_path, write_job, capsys):
    assert {"convnext_tiny", "vit_small_patch16_224", "test_resnet"} <= timm_arch_names()
    code = ("import sys; from orchestrator.train.timm_models import check_timm_arch; "
            "check_timm_arch('timm/convnext_tiny'); print('timm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"                                  # the stored list answered
    bad = write_job(timm_job(tmp_path, "bad", "timm/convnext_tinny"), "bad.yaml")
    assert main(["validate", str(bad)]) == 2
    assert "model.arch: timm has no model 'convnext_tinny' (did you mean 'convnext_tiny'" in capsys.readouterr().err


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_timm_model_plans_trains_and_exports_to_onnx(tmp_path, write_job, capsys, arch):
    onnxruntime = pytest.importorskip("onnxruntime")
    name = arch.split("/")[1]
    job = write_job(timm_job(tmp_path, name, arch), f"{name}.yaml")
    assert main(["plan", str(job), "--json", "--local"]) == 0
    groups = json.loads(capsys.readouterr().out)["param_groups"]
    assert sum(g["trainable"] for g in groups) == sum(g["num_params"] for g in groups) > 0   # a timm model trains whole
    assert main(["train", str(job), "--local"]) == 0
    out = tmp_path / f"{name}.onnx"
    fold = ["--fold-bn"] if arch in ("timm/test_resnet", "timm/test_efficientnet") else []   # BatchNorm families
    assert main(["export", str(tmp_path / "runs" / name), "--format", "onnx", *fold, "--out", str(out)]) == 0
    assert "onnxruntime checked" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": torch.zeros(2, 3, 32, 32).numpy()})[0].shape == (2, 3)


def _hf_cache(tmp_path, monkeypatch, repo: str, tensors: dict) -> None:
    """The layout huggingface_hub's cache (and so timm's pretrained=True) reads: refs/main -> snapshots/<rev>/."""
    import huggingface_hub.constants

    root = tmp_path / "hf" / "hub"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file(tensors, folder / "snapshots" / "0123abcd" / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_vit"])
def test_timm_pretrained_weights_come_from_the_hugging_face_cache(tmp_path, monkeypatch, write_job, capsys, name):
    """Fine-tuning a timm ResNet, ConvNeXt and ViT from the files timm's pretrained=True reads: the backbone
    loads, the 1000-class head is left for the job's 3, and the run trains and exports."""
    import timm

    source = timm.create_model(name, num_classes=1000).state_dict()
    _hf_cache(tmp_path, monkeypatch, f"timm/{name}.r160_in1k", {k: v.contiguous() for k, v in source.items()})
    job = write_job(timm_job(tmp_path, "pre", f"timm/{name}", model={"weights": "DEFAULT"}), "pre.yaml")
    assert main(["train", str(job), "--local"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"timm {name}.r160_in1k" in printed and f"models--timm--{name}.r160_in1k" in printed
    target = timm.create_model(name, num_classes=3).state_dict()
    backbone = len([k for k, v in source.items() if target[k].shape == v.shape or k == "pos_embed"])
    assert f"loaded {backbone} tensors" in printed and " 0 missing, 0 unexpected" in printed   # all but the new head
    if name == "test_vit":                     # trained at 160 px, fine-tuned at 32: the position grid is resampled
        assert "pos_embed resampled from a 10x10 to a 2x2 patch grid" in printed
    assert main(["export", str(tmp_path / "runs" / "pre"), "--format", "onnx", "--out", str(tmp_path / "pre.onnx")]) == 0


def test_timm_weights_not_on_this_machine_say_where_they_were_looked_for(tmp_path, monkeypatch, write_job, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    job = write_job(timm_job(tmp_path, "gone", "timm/test_convnext", model={"weights": "DEFAULT"}), "gone.yaml")
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert "model.weights: timm test_convnext." in err and str(tmp_path / "empty" / "models--timm--test_convnext.") in err
    assert "nothing is downloaded at run time" in err and len(err.strip().splitlines()) == 1
    tagged = write_job(timm_job(tmp_path, "tag", "timm/test_convnext", model={"weights": "no_such_tag"}), "tag.yaml")
    assert main(["validate", str(tagged)]) == 2
    assert "timm has no pretrained 'test_convnext.no_such_tag'; timm/test_convnext's tags: DEFAULT, " in capsys.readouterr().err
