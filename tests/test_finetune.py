"""Issue 11: fine-tuning fidelity: a new head, weights that really load, frozen means frozen, schedules
per group, lambda/onecycle/poly, augmentations as written, glob freezing and gradual unfreezing."""

import io
import json
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_job
from safetensors.torch import save as save_safetensors

from orchestrator.cli import main
from orchestrator.config.errors import SpecError
from orchestrator.config.jobfile import validate_spec
from orchestrator.config.schedule import lr_multiplier
from orchestrator.config.spec import DataSpec, ModelSpec, ScheduleSpec
from orchestrator.data.augment import check_transforms
from orchestrator.data.transforms import build_transform
from orchestrator.train.models import (FreezeError, ModelError, build_architecture, build_model, freeze_targets,
                                       head_module_names)
from orchestrator.train.weights import WeightsError


def resnet_state(num_classes: int, head_value: float | None = None) -> dict:
    torch.manual_seed(1)
    state = build_architecture("resnet18", num_classes, 32).state_dict()
    if head_value is not None:
        state["fc.weight"] = torch.full_like(state["fc.weight"], head_value)
    return state


def write_run_folder(root, name: str, state: dict, classes: list[str]) -> None:
    """A run folder as this tool writes it: the best checkpoint and model.safetensors naming the classes."""
    folder = root / name
    (folder / "checkpoint_best").mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"version": 1, "model": state}, buffer)
    (folder / "checkpoint_best" / "checkpoint.pt").write_bytes(buffer.getvalue())
    metadata = {"classes": ",".join(classes)} if classes else {}
    (folder / "model.safetensors").write_bytes(save_safetensors({k: v.contiguous() for k, v in state.items()},
                                                                metadata=metadata))


# 0: a new head for new classes ----------------------------------------------------------------------------

def test_the_head_is_new_even_when_the_class_count_matches(tmp_path):
    torch.save(resnet_state(5, head_value=7.0), tmp_path / "five.pth")
    built = build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "five.pth")), 5, 32)
    assert not torch.any(built.model.fc.weight == 7.0)                   # re-initialised, not the old classes' head
    assert built.report.new_head == ["fc.weight", "fc.bias"] and built.renewed == ["fc"]
    assert torch.equal(built.model.conv1.weight, resnet_state(5)["conv1.weight"])
    kept = build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "five.pth"), keep_head=True), 5, 32)
    assert torch.all(kept.model.fc.weight == 7.0) and kept.report.new_head == []


def test_keeping_the_head_of_a_run_with_other_classes_is_refused(tmp_path):
    write_run_folder(tmp_path, "digits04", resnet_state(5, head_value=7.0), ["0", "1", "2", "3", "4"])
    spec = ModelSpec(arch="resnet18", weights=str(tmp_path / "digits04"), keep_head=True)
    with pytest.raises(ModelError, match="model.keep_head: the head of .* other classes"):
        build_model(spec, 5, 32, class_names=["5", "6", "7", "8", "9"])
    same = build_model(spec, 5, 32, class_names=["0", "1", "2", "3", "4"])   # going on with the same classes
    assert torch.all(same.model.fc.weight == 7.0)
    new = build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "digits04")), 5, 32, class_names=["5", "6", "7", "8", "9"])
    assert not torch.any(new.model.fc.weight == 7.0)


def test_a_run_folder_without_class_names_does_not_block_keep_head(tmp_path):
    write_run_folder(tmp_path, "src", resnet_state(5, head_value=7.0), [])     # metadata without classes
    spec = ModelSpec(arch="resnet18", weights=str(tmp_path / "src"), keep_head=True)
    assert torch.all(build_model(spec, 5, 32, class_names=["a", "b", "c", "d", "e"]).model.fc.weight == 7.0)


def test_the_shipped_finetune_job_starts_with_a_new_head(tmp_path, write_job, capsys):
    job = validate_spec(tiny_job(tmp_path / "runs", "src", schedule={"epochs": 1, "warmup_epochs": 0},
                                 scaling={"num_workers": 1})).to_dict()
    assert main(["train", str(write_job(job, "src.yaml")), "--local"]) == 0
    job.update(name="ft", data={**job["data"], "classes": [5, 6, 7]}, model={**job["model"], "weights": str(tmp_path / "runs" / "src")})
    capsys.readouterr()
    assert main(["train", str(write_job(job, "ft.yaml")), "--local"]) == 0
    assert "new head fc: initialised with kaiming_normal" in capsys.readouterr().out


# 2, 5: weights that really load, or say why not ------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["model.", "module.", "backbone.", "module.model."])
def test_common_key_prefixes_are_stripped(tmp_path, prefix):
    torch.save({f"{prefix}{k}": v for k, v in resnet_state(10).items()}, tmp_path / "w.pth")
    report = build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "w.pth")), 10, 32).report
    assert len(report.loaded) == 120 and report.unexpected == []
    assert any("stripped the key prefix" in note for note in report.notes)


def test_weights_prefix_and_the_backbone_share(tmp_path):
    torch.save({f"encoder.trunk.{k}": v for k, v in resnet_state(10).items()}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"only 0 of the backbone's 100 tensors loaded .* model.weights_prefix"):
        build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "w.pth")), 10, 32)
    report = build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "w.pth"), weights_prefix="encoder.trunk."), 10, 32).report
    assert len(report.loaded) == 120
    anyway = build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "w.pth"), min_backbone_loaded=0), 10, 32)
    assert anyway.report.loaded == []


def test_exit_2_when_nothing_of_the_backbone_loads(tmp_path, write_job, capsys):
    torch.save({f"encoder.trunk.{k}": v for k, v in resnet_state(3).items()}, tmp_path / "w.pth")
    job = tiny_job(tmp_path / "runs", "prefixed", model={"arch": "resnet18", "weights": str(tmp_path / "w.pth")},
                   scaling={"num_workers": 1})
    assert main(["train", str(write_job(job)), "--local"]) == 2
    assert "model.weights: only 0 of the backbone's" in capsys.readouterr().err


def test_weights_of_another_architecture_are_named_before_any_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="ResNet50_Weights.IMAGENET1K_V1 are weights of another architecture than model.arch resnet18"):
        build_model(ModelSpec(arch="resnet18", weights="ResNet50_Weights.IMAGENET1K_V1"), 5, 32)


def test_a_whole_pickled_model_gets_its_own_message(tmp_path):
    torch.save(build_architecture("resnet18", 5, 32), tmp_path / "model.pth")
    with pytest.raises(WeightsError, match=r"holds a whole pickled model \(.*\).*torch.save\(model.state_dict\(\)"):
        build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "model.pth")), 5, 32)


def test_a_run_folder_on_s3_is_a_weights_source(tmp_path, s3_bucket):
    write_run_folder(tmp_path, "src", resnet_state(5, head_value=7.0), ["a", "b", "c", "d", "e"])
    for path in ("checkpoint_best/checkpoint.pt", "model.safetensors"):
        s3_bucket.put_object(Bucket="weights", Key=f"runs/src/{path}", Body=(tmp_path / "src" / path).read_bytes())
    spec = ModelSpec(arch="resnet18", weights="s3://weights/runs/src", keep_head=True)
    built = build_model(spec, 5, 32, class_names=["a", "b", "c", "d", "e"])
    assert "run s3://weights/runs/src (checkpoint_best/checkpoint.pt)" in built.report.source
    assert torch.all(built.model.fc.weight == 7.0) and len(built.report.loaded) == 122
    with pytest.raises(ModelError, match="model.keep_head"):
        build_model(spec, 5, 32, class_names=["v", "w", "x", "y", "z"])   # the classes came from S3 too


# 1: every torchvision classification model ------------------------------------------------------------------
# (tests/test_models.py::test_every_torchvision_classifier_builds_plans_and_trains_a_step)


# 3: frozen means frozen -------------------------------------------------------------------------------------

@pytest.mark.parametrize("train_bn", [True, False])
def test_frozen_batchnorm_statistics_move_only_with_train_bn(train_bn):
    from orchestrator.config.plan import plan_groups
    from orchestrator.config.spec import JobSpec
    from orchestrator.train.loop import StepSettings, Trainee, train_one_epoch
    from orchestrator.train.models import frozen_norm_layers
    from orchestrator.train.optim import build_optimizer

    spec = JobSpec.model_validate({"model": {"arch": "resnet18", "freeze": ["conv1", "bn1", "layer1"], "train_bn": train_bn}})
    model = build_model(spec.model, 3, 32).model
    before = model.bn1.running_mean.clone(), model.layer2[0].bn1.running_mean.clone()
    trainee = Trainee(model, build_optimizer(model, plan_groups(spec, 0.1), spec.optim),
                      eval_modules=[] if train_bn else frozen_norm_layers(model))
    batch = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
    train_one_epoch(trainee, batch, StepSettings(1, 1, lambda step: 1.0, torch.device("cpu")), 0, 0)
    assert torch.equal(model.bn1.running_mean, before[0]) is (not train_bn)
    assert not torch.equal(model.layer2[0].bn1.running_mean, before[1])          # trainable BN always updates


# 4, 6, 9: LR columns from the start, a schedule per group, gradual unfreezing ---------------------------------

def test_group_schedules_and_gradual_unfreezing_in_a_run(tmp_path, write_job, capsys):
    job = tiny_job(tmp_path / "runs", "gradual", scaling={"num_workers": 1},
                   model={"arch": "resnet18", "freeze": ["layer*"], "train_bn": False,
                          "unfreeze": [{"at_epoch": 1, "modules": ["layer4"]}, {"at_epoch": 2, "modules": ["*"]}]},
                   optim={"name": "sgd", "base_lr": 0.01, "base_batch_size": 8, "norm_bias_weight_decay": None,
                          "param_groups": [{"match": "fc.*", "lr_mult": 10.0}, {"match": "layer*", "schedule": {"name": "constant"}}]},
                   schedule={"name": "cosine", "epochs": 3, "warmup_epochs": 0})
    assert main(["train", str(write_job(job)), "--local"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1: unfroze 15 parameter tensors (42 still frozen)" in out           # layer4
    assert "epoch 2: unfroze 42 parameter tensors (0 still frozen)" in out
    rows = pq.read_table(tmp_path / "runs" / "gradual" / "metrics.parquet").to_pylist()
    assert {"lr/fc.*", "lr/layer*", "lr/rest"} <= set(rows[0])                   # every group's column from epoch 0
    assert rows[0]["lr/layer*"] is None                                         # nothing of it trained yet
    assert rows[1]["lr/layer*"] == rows[2]["lr/layer*"] == pytest.approx(0.01)  # its own schedule: constant
    assert rows[2]["lr/fc.*"] < rows[1]["lr/fc.*"] < rows[0]["lr/fc.*"]         # the head follows cosine
    plan = json.loads((tmp_path / "runs" / "gradual" / "plan.json").read_text())
    assert [g["schedule"] for g in plan["param_groups"]] == [None, {"name": "constant"}, None]


def test_freeze_by_glob():
    model = build_architecture("mobilenet_v2", 3, 32)
    names = freeze_targets(model, ["features.0.*"], head_module_names("mobilenet_v2", 32))
    assert names and all(n.startswith("features.0.") for n in names)
    resnet = build_architecture("resnet18", 3, 32)
    layers = freeze_targets(resnet, ["layer*"], ("fc",))
    assert {n.split(".")[0] for n in layers} == {"layer1", "layer2", "layer3", "layer4"}
    with pytest.raises(FreezeError, match=r"model.freeze: 'block\*' matches no module"):
        freeze_targets(resnet, ["block*"], ("fc",))


@pytest.mark.parametrize("model, expected", [
    ({"unfreeze": [{"at_epoch": 1, "modules": ["layer4"]}]}, "model.unfreeze: set, but model.freeze is empty"),
    ({"freeze": ["layer*"], "unfreeze": [{"at_epoch": 2, "modules": ["layer4"]}, {"at_epoch": 1, "modules": ["*"]}]},
     "model.unfreeze: at_epoch must be strictly increasing"),
    ({"freeze": ["layer*"], "unfreeze_at_epoch": 1, "unfreeze": [{"at_epoch": 2, "modules": ["*"]}]}, "give either it or model.unfreeze"),
])
def test_bad_unfreeze_steps(model, expected):
    with pytest.raises(SpecError, match=expected):
        validate_spec({"model": model, "schedule": {"epochs": 5}})


def test_an_unfreeze_step_that_frees_nothing_exits_2_at_plan(write_job, capsys):
    job = write_job({"model": {"freeze": ["layer4"], "unfreeze": [{"at_epoch": 1, "modules": ["layer1"]}]},
                     "schedule": {"epochs": 3}, "scaling": {"num_workers": 1}})
    assert main(["plan", str(job)]) == 2
    assert "model.unfreeze.0.modules: ['layer1'] frees nothing that is still frozen at epoch 1" in capsys.readouterr().err


def test_a_group_schedule_is_validated_with_its_key(write_job, capsys):
    job = write_job({"optim": {"param_groups": [{"match": "fc.*", "schedule": {"name": "cosin"}}, {"match": "x", "schedule": {"epochs": 3}}]}})
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert "optim.param_groups.0.schedule.name: unknown value 'cosin' (did you mean 'cosine'?)" in err
    assert "optim.param_groups.1.schedule.epochs: every group trains for schedule.epochs" in err


# 7: lambda, onecycle, poly ----------------------------------------------------------------------------------

def steps(steps_per_epoch: int, total_steps: int) -> SimpleNamespace:
    return SimpleNamespace(steps_per_epoch=steps_per_epoch, warmup_steps=0, total_steps=total_steps, scaled_lr=1.0)


def torch_lrs(make_scheduler, count: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(count):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_lambda_matches_torch_lambda_lr():
    sched = ScheduleSpec(name="lambda", epochs=8, expression="0.9 ** epoch * (1 if epoch < 5 else 0.5)")
    ours = [lr_multiplier(4 * e, sched, steps(4, 32)) for e in range(8)]
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 0.9 ** epoch * (1 if epoch < 5 else 0.5)), 8)
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_onecycle_matches_torch_one_cycle_lr():
    sched = ScheduleSpec(name="onecycle", epochs=5, pct_start=0.3, div_factor=25, final_div_factor=1e4)
    ours = [lr_multiplier(s, sched, steps(8, 40)) for s in range(40)]
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=40, pct_start=0.3,
                                                                      cycle_momentum=False), 40)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_poly_matches_torch_polynomial_lr():
    sched = ScheduleSpec(name="poly", epochs=4, power=2.0)
    ours = [lr_multiplier(s, sched, steps(5, 20)) for s in range(20)]
    theirs = torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=20, power=2.0), 20)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("expression, expected", [
    (None, "needs an expression"),
    ("__import__('os').system('true')", "is not allowed"),
    ("epoch.__class__", "is not allowed"),
    ("1 - epoch", "must be finite and >= 0"),
    ("10.0 ** (10 ** epoch)", "overflows a float at epoch 3"),   # at once, instead of computing forever
    ("0.9 **", "not an expression"),
])
def test_bad_lambda_expressions_are_refused_at_validate(expression, expected):
    with pytest.raises(SpecError, match=expected):
        validate_spec({"schedule": {"name": "lambda", "epochs": 5, "expression": expression}})


# 8: augmentations with strengths, the standard policies, in the order written ---------------------------------

def test_augmentations_take_arguments_and_run_in_the_order_written():
    spec = DataSpec(image_size=16, augment=["gaussian_noise", {"name": "color_jitter", "brightness": 0.2},
                                            {"name": "rotate", "degrees": 15}, "random_erasing"])
    transform = build_transform(spec, train=True, pre_sized=False)
    kinds = [type(t).__name__ for t in transform.transforms]
    assert kinds == ["Resize", "CenterCrop", "ToDtype", "GaussianNoise", "ColorJitter", "RandomRotation", "RandomErasing", "Normalize"]
    assert transform.transforms[4].brightness == (0.8, 1.2)
    assert transform(torch.randint(0, 255, (3, 20, 24), dtype=torch.uint8)).shape == (3, 16, 16)


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment", {"name": "autoaugment", "policy": "cifar10"}])
def test_the_standard_policies_run(policy):
    out = build_transform(DataSpec(image_size=16, augment=[policy, "hflip"]), True, False)(
        torch.randint(0, 255, (3, 20, 24), dtype=torch.uint8))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32


@pytest.mark.parametrize("entry, expected", [
    ({"name": "color_jitter", "brightnes": 0.2},
     r"entry 0 \(color_jitter\): takes no 'brightnes' \(did you mean 'brightness'\?\); its arguments: brightness, contrast"),
    ({"brightness": 0.2}, "entry 0 has no name"),
    ({"name": "autoaugment", "policy": "mnist"}, "entry 0 \\(autoaugment\\)"),
    ("flip_h", "unknown augmentation 'flip_h'"),
])
def test_bad_augmentation_entries_name_the_entry(entry, expected):
    """Names and argument names when the job file is read; values once each transform is built (check_transforms)."""
    with pytest.raises(SpecError, match=f"data.augment: {expected}"):
        check_transforms(validate_spec({"data": {"augment": [entry]}}))
