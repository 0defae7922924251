"""Issue 13: the large-batch recipe keys. Each test fails if its key is ignored."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_job
from safetensors.torch import load_file
from torchvision.transforms import v2

from orchestrator.cli import main
from orchestrator.config.errors import SpecError
from orchestrator.config.jobfile import validate_spec
from orchestrator.config.plan import make_plan, plan_groups
from orchestrator.config.spec import DataSpec, JobSpec, ModelSpec
from orchestrator.data.loaders import make_dataset, train_loader
from orchestrator.data.readers import GLYPHS
from orchestrator.data.sources import load_splits
from orchestrator.data.transforms import build_transform
from orchestrator.train.checkpoint import evaluated_weights
from orchestrator.train.loop import classification_loss
from orchestrator.train.models import build_model
from orchestrator.train.optim import build_optimizer


def local_job(tmp_path, name, **sections):
    sections["scaling"] = {"num_workers": 1, "per_worker_batch_size": 8, **sections.get("scaling", {})}
    return tiny_job(tmp_path / "runs", name, **sections)


# model.zero_init_residual

@pytest.mark.parametrize("arch, last", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_zeroes_every_blocks_last_bn_gamma_at_step_0(arch, last):
    built = build_model(ModelSpec(arch=arch, zero_init_residual=True), 5, 32)
    gammas = {n: p for n, p in built.model.named_parameters() if n.endswith(f".{last}.weight")}
    assert len(gammas) == (8 if arch == "resnet18" else 16)
    assert all(torch.count_nonzero(p) == 0 for p in gammas.values())
    plain = build_model(ModelSpec(arch=arch), 5, 32)
    assert all(torch.count_nonzero(p) > 0 for n, p in plain.model.named_parameters() if n.endswith(f".{last}.weight"))


def test_zero_init_residual_leaves_loaded_weights_alone(tmp_path):
    source = build_model(ModelSpec(arch="resnet18"), 5, 32).model.state_dict()
    torch.save(source, tmp_path / "w.pt")
    built = build_model(ModelSpec(arch="resnet18", weights=str(tmp_path / "w.pt"), zero_init_residual=True), 5, 32)
    assert torch.equal(built.model.layer1[0].bn2.weight, source["layer1.0.bn2.weight"])


def test_zero_init_residual_on_an_architecture_without_residual_blocks_names_the_ones_with():
    with pytest.raises(SpecError, match=r"model.zero_init_residual: vgg11 .* resnet\*, resnext\*, wide_resnet\*"):
        validate_spec({"model": {"arch": "vgg11", "zero_init_residual": True}})


# optim.name: lars | lamb

def _one_step(name: str, weight_decay: float):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    spec = JobSpec.model_validate({"optim": {"name": name, "weight_decay": weight_decay, "momentum": 0.0}})
    optimizer = build_optimizer(model, plan_groups(spec, scaled_lr=0.1), spec.optim)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(8, 4)).pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return optimizer, {n: before[n] - p.detach() for n, p in model.named_parameters()}, grads, before


@pytest.mark.parametrize("name, cls", [("lars", "Lars"), ("lamb", "Lamb")])
def test_lars_and_lamb_are_timms_and_leave_norm_and_bias_out_of_the_trust_ratio(name, cls):
    import timm.optim

    optimizer, moved, grads, before = _one_step(name, weight_decay=1e-4)
    assert type(optimizer) is getattr(timm.optim, cls)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["rest [norm/bias]"]["weight_decay"] == 0 and groups["rest"]["weight_decay"] == 1e-4
    if name == "lars":
        # bias and BN: plain SGD (lr x grad); the weight: scaled by its trust ratio, so not plain SGD
        assert torch.allclose(moved["0.bias"], 0.1 * grads["0.bias"], atol=1e-7)
        assert torch.allclose(moved["1.weight"], 0.1 * grads["1.weight"], atol=1e-7)
        assert not torch.allclose(moved["0.weight"], 0.1 * (grads["0.weight"] + 1e-4 * before["0.weight"]), atol=1e-7)
    else:
        # LAMB's first step moves each element by lr x sign-like Adam ratio, times the trust ratio (1 for no-decay groups)
        adam_step = 0.1 * grads["1.weight"] / (grads["1.weight"].abs() + 1e-8)
        assert torch.allclose(moved["1.weight"], adam_step, atol=1e-5)
        weight_step = 0.1 * (grads["0.weight"] / (grads["0.weight"].abs() + 1e-8) + 1e-4 * before["0.weight"])
        assert not torch.allclose(moved["0.weight"], weight_step, atol=1e-5)   # scaled by its trust ratio


# loss.label_smoothing

def test_label_smoothing_reaches_the_training_loss(tmp_path, write_job):
    logits = torch.tensor([[20.0, -20.0, -20.0]])
    assert classification_loss(logits, torch.tensor([0]))[0] < 1e-6
    assert classification_loss(logits, torch.tensor([0]), 0.3)[0] > 1.0
    losses = {}
    for smoothing in (0.0, 0.4):
        # base_lr 0.01: at the tiny job's 0.1 this one epoch diverges here (train loss 3.6, above ln 3), and a
        # diverging loss says nothing about smoothing
        job = write_job(local_job(tmp_path, f"ls{smoothing}", loss={"label_smoothing": smoothing}, optim={"base_lr": 0.01},
                                  schedule={"epochs": 1, "warmup_epochs": 0}), f"ls{smoothing}.yaml")
        assert main(["train", str(job), "--local"]) == 0
        losses[smoothing] = pq.read_table(tmp_path / "runs" / f"ls{smoothing}" / "metrics.parquet").to_pylist()[0]
    assert losses[0.4]["train_loss"] > losses[0.0]["train_loss"] + 0.1
    assert losses[0.4]["val_loss"] != losses[0.0]["val_loss"]


# data.mixup_alpha, data.cutmix_alpha

@pytest.mark.parametrize("key", ["mixup_alpha", "cutmix_alpha"])
def test_mixup_and_cutmix_mix_the_training_batches(key):
    data = DataSpec(classes=[0, 1, 2], image_size=16, **{key: 1.0})
    splits = load_splits(data, 0)
    plan = make_plan(JobSpec.model_validate({"data": data.model_dump(), "scaling": {"num_workers": 1, "per_worker_batch_size": 16}}),
                     len(splits.train), 1)
    torch.manual_seed(0)
    images, labels = next(iter(train_loader(make_dataset(splits.train, data, True, "train"), data, plan, 0, 0, 3)))
    assert labels.shape == (16, 3) and labels.dtype == torch.float32
    assert torch.allclose(labels.sum(1), torch.ones(16))
    assert (labels.max(1).values < 1).any()                        # some rows are two classes mixed
    plain = DataSpec(classes=[0, 1, 2], image_size=16)
    torch.manual_seed(0)
    _, hard = next(iter(train_loader(make_dataset(splits.train, plain, True, "train"), plain, plan, 0, 0, 3)))
    assert hard.dtype == torch.long


def test_a_run_with_mixup_and_cutmix_trains(tmp_path, write_job):
    job = write_job(local_job(tmp_path, "mix", data={"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
                              schedule={"epochs": 1, "warmup_epochs": 0}))
    assert main(["train", str(job), "--local"]) == 0


# model.ema_decay

def test_ema_is_what_is_evaluated_checkpointed_and_exported(tmp_path, write_job, capsys):
    job = write_job(local_job(tmp_path, "ema", model={"ema_decay": 0.9}))
    assert main(["train", str(job), "--local"]) == 0
    run = tmp_path / "runs" / "ema"
    best = torch.load(run / "checkpoint_best" / "checkpoint.pt", weights_only=True)
    raw, ema = best["model"], evaluated_weights(best)
    assert set(raw) == set(ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    exported = load_file(run / "model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)     # the weights written are the EMA's
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "--out", str(tmp_path)]) == 0   # and they are what was tested
    assert json.loads(capsys.readouterr().out)["acc1"] == json.loads((run / "summary.json").read_text())["test_acc1"]


def test_a_resumed_ema_run_equals_an_unbroken_one(tmp_path, write_job):
    import shutil

    unbroken = write_job(local_job(tmp_path, "ema_full", model={"ema_decay": 0.8}, run={"deterministic": True}), "a.yaml")
    assert main(["train", str(unbroken), "--local"]) == 0
    full, halves = tmp_path / "runs" / "ema_full", tmp_path / "runs" / "ema_halves"
    for kept in ("checkpoint_epoch_0000", "checkpoint_best"):     # as if killed after epoch 1: its checkpoint, which
        (halves / kept).mkdir(parents=True)                         # was the best so far too
        shutil.copy(full / "checkpoint_epoch_0000" / "checkpoint.pt", halves / kept / "checkpoint.pt")
    resumed = write_job(local_job(tmp_path, "ema_halves", model={"ema_decay": 0.8}, run={"deterministic": True}), "b.yaml")
    assert main(["train", str(resumed), "--local"]) == 0       # epoch 2 from the checkpoint, EMA as it was
    a, b = load_file(full / "model.safetensors"), load_file(halves / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# data.eval_resize

def test_eval_resize_resizes_the_short_side_then_crops():
    data = DataSpec(image_size=32, eval_resize=40)
    image = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    expected = v2.Compose([v2.Resize(40, antialias=True), v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(list(data.mean), list(data.std))])(image)
    assert torch.equal(build_transform(data, train=False, pre_sized=False)(image), expected)
    plain = build_transform(DataSpec(image_size=32), train=False, pre_sized=False)(image)
    assert not torch.equal(plain, expected)
    pre_sized = build_transform(data, train=False, pre_sized=True)(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8))
    assert pre_sized.shape == (3, 32, 32)                           # arrays at image_size are resized and cropped too


# bf16 autocast and channels_last on the CPU

def test_bf16_autocast_and_channels_last_train_on_cpu(tmp_path, write_job):
    job = write_job(local_job(tmp_path, "bf16", scaling={"num_workers": 1, "per_worker_batch_size": 8, "amp": "bf16",
                                                         "channels_last": True}))
    assert main(["train", str(job), "--local"]) == 0
    rows = pq.read_table(tmp_path / "runs" / "bf16" / "metrics.parquet").to_pylist()
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in rows)


def test_bf16_autocast_runs_the_convolutions_in_bf16_and_channels_last_keeps_the_layout():
    from orchestrator.train.loop import autocast

    model = build_model(ModelSpec(arch="resnet18"), 3, 32).model.to(memory_format=torch.channels_last)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen = {}
    model.conv1.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    with autocast(torch.device("cpu"), "bf16"):
        model(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert seen["dtype"] == torch.bfloat16


# data.synthetic.kind: glyphs

def test_glyphs_are_seeded_sized_and_labelled():
    spec = DataSpec(source="synthetic", image_size=24,
                    synthetic={"kind": "glyphs", "num_classes": 5, "train_samples": 50, "val_samples": 10, "test_samples": 10})
    first, again = load_splits(spec, 3), load_splits(spec, 3)
    assert first.class_names == list(GLYPHS[:5]) and first.train.items.shape == (50, 24, 24, 3)
    assert np.array_equal(first.train.items, again.train.items)
    assert not np.array_equal(first.train.items, load_splits(spec, 4).train.items)
    assert np.bincount(first.train.labels).tolist() == [10] * 5
    with pytest.raises(Exception, match="glyphs has 32 classes at most"):
        load_splits(DataSpec(source="synthetic", synthetic={"kind": "glyphs", "num_classes": 40}), 0)


# bench large-batch: the rule's regime (issue 24), its summary and its --json contract

@pytest.mark.parametrize("preset_name", ["cpu", "gpu"])
def test_every_large_batch_row_is_in_the_rules_regime(preset_name):
    from orchestrator.bench.large_batch import FACTORS, MIN_STEPS, PRESETS, configs, job
    from orchestrator.config.schedule import lr_multiplier

    preset = PRESETS[preset_name]
    b0 = preset.b0
    rows = [(c.global_batch_size, c.warmup_epochs > 0, c.optimizer) for c in configs(b0)]
    assert rows == ([(b0, False, "sgd")] + [(k * b0, True, "sgd") for k in FACTORS[1:]]
                    + [(16 * b0, False, "sgd"), (16 * b0, True, "lars"), (16 * b0, True, "lamb")])
    for config in configs(b0):
        spec = validate_spec(job(config, 0, "/tmp/x", preset))
        plan = make_plan(spec, spec.data.synthetic.train_samples, 1)
        assert plan.global_batch_size == config.global_batch_size and spec.schedule.epochs == preset.epochs
        assert spec.scaling.per_worker_batch_size == b0          # every forward pass: the same micro-batch for BN
        assert plan.total_steps >= MIN_STEPS and (config.global_batch_size > b0 or plan.total_steps >= 3000)
        if config.optimizer == "lamb":                            # sqrt scaling of Adam's LR (You et al. 2019)
            assert plan.scaled_lr == pytest.approx(0.001 * (config.global_batch_size / 256) ** 0.5)
        else:                                                     # linear scaling from B0's LR, LARS too
            assert plan.scaled_lr == pytest.approx(plan_of_b0(preset).scaled_lr * config.global_batch_size / b0)
        if config.warmup_epochs and config.optimizer == "sgd":    # the ramp starts at B0's LR, one epoch long
            assert plan.scaled_lr * lr_multiplier(0, spec.schedule, plan) == pytest.approx(plan_of_b0(preset).scaled_lr)
            assert plan.warmup_steps == plan.steps_per_epoch


def plan_of_b0(preset):
    from orchestrator.bench.large_batch import Config, job

    spec = validate_spec(job(Config(preset.b0, 0.0, "sgd"), 0, "/tmp/x", preset))
    return make_plan(spec, spec.data.synthetic.train_samples, 1)


def _result(batch, warmup, optimizer, seed, curve, test_acc1):
    from orchestrator.bench.large_batch import Config, Result

    return Result(Config(batch, warmup, optimizer), seed, 0.1, test_acc1, curve[-1][0], curve, "completed", 1.0)


def test_steps_to_target_reads_the_seeds_mean_curve_and_the_slope_is_log_log():
    from orchestrator.bench.large_batch import scaling_slope, summarize

    results = [_result(16, 0.0, "sgd", 0, [(100, 0.5), (200, 0.80), (300, 0.90)], 0.89),
               _result(16, 0.0, "sgd", 1, [(100, 0.6), (200, 0.84), (300, 0.92)], 0.91),
               _result(32, 1.0, "sgd", 0, [(50, 0.7), (100, 0.90), (150, 0.91)], 0.90),
               _result(32, 1.0, "sgd", 1, [(50, 0.7), (100, 0.92), (150, 0.91)], 0.88),
               _result(64, 0.0, "sgd", 0, [(25, 0.1), (50, 0.2), (75, 0.3)], 0.30)]
    summary = summarize(results, 16)
    assert summary["target_val_acc1"] == pytest.approx(0.91 - 0.01)         # B0's final mean, less a point
    rows = {(r["global_batch_size"], r["warmup_epochs"]): r for r in summary["rows"]}
    assert rows[16, 0.0]["steps_to_target"] == 300                            # mean 0.82 at 200, 0.91 at 300
    assert rows[32, 1.0]["steps_to_target"] == 100 and rows[64, 0.0]["steps_to_target"] is None
    assert rows[16, 0.0]["test_acc1"] == pytest.approx(0.90) and rows[16, 0.0]["test_acc1_std"] == pytest.approx(0.01414, abs=1e-4)
    assert set(rows[16, 0.0]) == {"global_batch_size", "warmup_epochs", "optimizer", "test_acc1", "test_acc1_std",
                                  "optimizer_steps", "steps_to_target"}
    assert summary["steps_to_target_slope"] == pytest.approx(-math.log2(3))    # 300 -> 100 steps over 2x: no warmup row left out
    assert scaling_slope([(16, 800), (32, 400), (64, 200)]) == pytest.approx(-1.0)
    assert scaling_slope([(16, 800)]) is None


def test_bn_sees_the_micro_batch_and_counts_every_forward_under_accumulation():
    """What BN sees at each large-batch row: the micro-batch's statistics, running stats updated per forward."""
    from orchestrator.train.loop import StepSettings, Trainee, train_one_epoch

    seen = []
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(2, 3, 8, 8))
    model[1].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[0]))
    model[1].reset_running_stats()
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))) for _ in range(8)]
    optimizer = build_optimizer(model, plan_groups(JobSpec(), scaled_lr=0.01), JobSpec().optim)
    train_one_epoch(Trainee(model, optimizer), data, StepSettings(2, 4, lambda step: 1.0, torch.device("cpu")), epoch=0, first_step=0)
    assert seen == [16] * 8 and int(model[1].num_batches_tracked) == 8


def test_timm_resnets_start_with_their_residual_branches_zeroed():
    """The large-batch bench's model: timm zero-inits each block's last BN gamma (Goyal et al. section 5.1)."""
    built = build_model(ModelSpec(arch="timm/test_resnet", head_init="default"), 5, 32)   # as the bench builds it
    blocks = [m for m in built.model.modules() if hasattr(m, "zero_init_last")]
    last = [(b.bn3 if hasattr(b, "bn3") else b.bn2).weight for b in blocks]
    assert len(last) == 4 and all(torch.count_nonzero(p) == 0 for p in last)
    assert built.head == ("fc",)


def test_a_timm_arch_is_checked_against_timms_list():
    from orchestrator.train.models import check_arch

    check_arch("timm/test_resnet")
    with pytest.raises(SpecError, match=r"model.arch: timm has no model 'test_resnt' \(did you mean 'test_resnet'"):
        check_arch("timm/test_resnt")


@pytest.mark.slow
def test_bench_large_batch_json(tmp_path, capsys):
    assert main(["bench", "large-batch", "--epochs", "1"]) == 2        # shorter than its warmup: refused at once
    assert "--epochs: 1" in capsys.readouterr().err
    assert main(["bench", "large-batch", "--json", "--seeds", "1", "--epochs", "2", "--images", "512",
                 "--plot", str(tmp_path / "lb.png")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) >= {"rows", "target_val_acc1"} and (tmp_path / "lb.png").is_file()
    rows = summary["rows"]
    assert [r["optimizer"] for r in rows] == ["sgd"] * 6 + ["lars", "lamb"]
    assert [r["optimizer_steps"] for r in rows] == [64, 32, 16, 8, 4, 4, 4, 4]
    assert all(r["test_acc1"] is not None and 0 <= r["test_acc1"] <= 1 for r in rows)
