"""Model surgery: heads of every family, loading what fits from files and the hub cache, freezing."""

import urllib.request

import pytest
import torch

from orchestrator.config.spec import ModelSpec
from orchestrator.train import models
from orchestrator.train.models import ModelError, build_architecture, build_model, head_module_names, trainability_rows
from orchestrator.train.weights import WeightsError, load_matching

MODEL_LIST = ["resnet18", "resnet50", "alexnet", "vgg16", "squeezenet1_0", "densenet121", "inception_v3", "googlenet",
              "shufflenet_v2_x1_0", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnext50_32x4d",
              "wide_resnet50_2", "mnasnet1_0", "efficientnet_b0", "convnext_tiny", "vit_b_16"]

EXPECTED_HEADS = {
    "resnet18": ("fc",), "alexnet": ("classifier.6",), "vgg16": ("classifier.6",), "squeezenet1_0": ("classifier.1",),
    "densenet121": ("classifier",), "inception_v3": ("AuxLogits.fc", "fc"), "googlenet": ("aux1.fc2", "aux2.fc2", "fc"),
    "mobilenet_v2": ("classifier.1",), "mobilenet_v3_small": ("classifier.3",), "efficientnet_b0": ("classifier.1",),
    "convnext_tiny": ("classifier.2",), "vit_b_16": ("heads.head",), "mnasnet1_0": ("classifier.1",),
}


def _uninitialised(arch: str, num_classes: int, image_size: int = 224) -> torch.nn.Module:
    """Real CPU tensors without paying for init (the values do not matter for shape matching)."""
    with torch.device("meta"):
        model = build_architecture(arch, num_classes, image_size)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for i, tensor in enumerate(model.state_dict().values()):
            tensor.fill_(i % 97 + 1)   # cheap, distinct per tensor, no NaNs from raw memory
    return model


@pytest.mark.parametrize("arch", list(EXPECTED_HEADS))
def test_head_found_for_every_family(arch):
    assert head_module_names(arch) == EXPECTED_HEADS[arch]


@pytest.mark.parametrize("arch", MODEL_LIST)
def test_imagenet_weights_partially_load_onto_5_classes(arch):
    source = _uninitialised(arch, 1000).state_dict()
    target = _uninitialised(arch, 5)
    report = load_matching(target, source, "imagenet-shaped")
    head = head_module_names(arch)
    skipped = {name.rsplit(".", 1)[0] for name, _, _ in report.skipped_shape}
    assert skipped == set(head)                                   # exactly the head(s) are skipped for shape
    assert all(src[0] == 1000 and dst[0] == 5 for _, src, dst in report.skipped_shape)
    assert not report.unexpected
    assert len(report.loaded) + len(report.skipped_shape) == len(source)
    for name in report.loaded:
        assert torch.equal(target.state_dict()[name], source[name])


def _save_resnet18_imagenet_shaped(path):
    model = build_architecture("resnet18", 1000, 32)
    torch.save(model.state_dict(), path)
    return model.state_dict()


def test_local_pth_onto_new_class_count_with_report(tmp_path, capsys):
    source = _save_resnet18_imagenet_shaped(tmp_path / "r18.pth")
    built = build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "r18.pth")), num_classes=5, image_size=32)
    report = built.report
    assert report.new_head == ["fc.weight", "fc.bias"] and report.skipped_shape == []
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(built.model.conv1.weight, source["conv1.weight"])
    assert built.renewed == ["fc"]                                 # only the new head is re-initialised
    assert "new head fc: initialised with kaiming_normal" in "\n".join(report.lines())
    # keep_head on a head for another class count: refused (issue 12), not a new head trained in its place
    with pytest.raises(ModelError, match=r"fc.weight is \(1000, 512\), the model needs \(5, 512\)"):
        build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "r18.pth"), keep_head=True), 5, 32)
    built = build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "r18.pth"), keep_head=True), 1000, 32)
    assert torch.equal(built.model.fc.weight, source["fc.weight"]) and built.report.skipped_shape == []


def test_safetensors_and_our_checkpoint_and_ddp_prefix(tmp_path):
    from safetensors.torch import save_file

    source = build_architecture("resnet18", 10, 32).state_dict()
    save_file({k: v.contiguous() for k, v in source.items()}, tmp_path / "w.safetensors")
    torch.save({"version": 1, "model": {f"module.{k}": v for k, v in source.items()}, "epoch": 3}, tmp_path / "ckpt.pt")
    for name in ("w.safetensors", "ckpt.pt"):
        built = build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / name), keep_head=True), num_classes=10, image_size=32)
        assert built.report.skipped_shape == [] and len(built.report.loaded) == len(source)
        assert built.renewed == []


def test_torchvision_weight_name_through_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    folder = tmp_path / "hub" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    _save_resnet18_imagenet_shaped(folder / "resnet18-f37072fd.pth")   # the file IMAGENET1K_V1 names
    built = build_model(ModelSpec(arch="resnet18", weights="IMAGENET1K_V1", keep_head=True), num_classes=1000, image_size=32)
    assert "ResNet18_Weights.IMAGENET1K_V1" in built.report.source
    assert built.report.skipped_shape == [] and len(built.report.loaded) == 122
    built = build_model(ModelSpec(arch="resnet18", weights="DEFAULT"), num_classes=5, image_size=32)
    assert len(built.report.loaded) == 120


def test_missing_hub_weights_name_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")   # no network: fail fast, never hang
    # urlopen caches its opener, proxies and all, on first use: the dead proxy must not outlive this test
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(WeightsError) as info:
        build_model(ModelSpec(arch="resnet18", weights="IMAGENET1K_V1"), num_classes=5, image_size=32)
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "empty" / "hub" / "checkpoints") in message


@pytest.mark.parametrize("weights, expected", [
    ("/nope/weights.pth", "no such file"),
    ("IMAGENET1K_V9", "not a file, a run folder, or a torchvision weight of resnet18"),
])
def test_bad_weights_are_named(weights, expected):
    with pytest.raises(WeightsError, match=expected):
        build_model(ModelSpec(arch="resnet18", weights=weights), num_classes=5, image_size=32)


def test_corrupt_weights_file(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pth is not a weights file"):
        build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "bad.pth")), num_classes=5, image_size=32)
    torch.save(build_architecture("resnet18", 5).state_dict(), tmp_path / "cut.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "cut.pth").read_bytes()[:5000])     # a download cut short
    with pytest.raises(WeightsError, match="cannot load .*cut.pth with weights_only=True"):
        build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "cut.pth")), num_classes=5, image_size=32)


def test_unknown_arch_suggests():
    with pytest.raises(ValueError, match="did you mean resnet18"):
        build_architecture("resnet181", 5)


def test_freeze_backbone_step_leaves_frozen_tensors_unchanged():
    from orchestrator.config.plan import plan_groups
    from orchestrator.config.spec import JobSpec
    from orchestrator.train.optim import build_optimizer

    spec = JobSpec.model_validate({"model": {"arch": "resnet18", "freeze": ["backbone"]}, "optim": {"name": "sgd"}})
    built = build_model(spec.model, num_classes=5, image_size=32)
    model = built.model
    optimizer = build_optimizer(model, plan_groups(spec, scaled_lr=0.1), spec.optim)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(model.fc.weight), id(model.fc.bias)}   # only trainable parameters
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(torch.randn(4, 3, 32, 32)).sum()
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == name.startswith("fc."), name
    rows = dict((top, (total, trainable)) for top, total, trainable in trainability_rows(model))
    assert rows["fc"] == (2565, 2565) and rows["layer4"][1] == 0


def test_freeze_prefixes_and_unknown_prefix():
    built = build_model(ModelSpec(arch="resnet18", freeze=["conv1", "layer1"]), num_classes=5, image_size=32)
    assert all(n.startswith(("conv1", "layer1")) for n in built.frozen) and "conv1.weight" in built.frozen
    with pytest.raises(models.FreezeError, match="'layer9' matches no module; top-level modules: bn1, conv1, fc"):
        build_model(ModelSpec(arch="resnet18", freeze=["layer9"]), num_classes=5, image_size=32)


def test_inception_aux_head_is_replaced_and_trains():
    built = build_model(ModelSpec(arch="inception_v3"), num_classes=3, image_size=299)
    model = built.model.train()
    out = model(torch.randn(2, 3, 299, 299))
    assert out.logits.shape == (2, 3) and out.aux_logits.shape == (2, 3)
    with pytest.raises(ValueError, match="data.image_size: inception_v3 cannot take 80x80 images"):
        models.check_input_size("inception_v3", 3, 80)
    models.check_input_size("resnet18", 3, 32)


INPUT_SIDES = (32, 28, 64, 96, 128, 160, 224, 299)


def smallest_side(arch: str) -> int:
    for side in INPUT_SIDES:
        try:
            models.check_input_size(arch, 3, side)
            return side
        except models.ModelError:
            continue
    raise AssertionError(f"{arch} takes none of {INPUT_SIDES}")


@pytest.mark.parametrize("arch", models.classification_models())
def test_every_torchvision_classifier_builds_plans_and_trains_a_step(arch):
    """All of torchvision.models.list_models: planned on the meta device, built, one SGD step at a small input."""
    from orchestrator.config.plan import make_plan
    from orchestrator.config.spec import JobSpec
    from orchestrator.train.loop import StepSettings, Trainee, train_one_epoch
    from orchestrator.train.optim import build_optimizer
    from orchestrator.train.resolve import count_group_sizes

    side = smallest_side(arch)
    spec = JobSpec.model_validate({"model": {"arch": arch, "num_classes": 3}, "data": {"image_size": side},
                                   "optim": {"momentum": 0.0, "param_groups": [{"match": "*.weight", "lr_mult": 2.0}]},
                                   "scaling": {"num_workers": 1, "per_worker_batch_size": 2}})
    plan = make_plan(spec, 2, 1)
    plan = plan.with_group_sizes(count_group_sizes(spec, plan.param_groups, 3))
    built = build_model(spec.model, 3, side)
    model = built.model
    assert sum(g.num_params for g in plan.param_groups) == sum(p.numel() for p in model.parameters())
    head = dict(model.named_parameters())[next(n for n, _ in model.named_parameters() if n.startswith(built.head[-1] + "."))]
    before = head.detach().clone()
    optimizer = build_optimizer(model, plan.param_groups, spec.optim)
    batch = [(torch.randn(2, 3, side, side), torch.tensor([0, 2]))]
    stats = train_one_epoch(Trainee(model, optimizer), batch, StepSettings(1, 1, lambda step: 1.0, torch.device("cpu")), 0, 0)
    assert torch.isfinite(torch.tensor(stats.train_loss)) and not torch.equal(head, before)
