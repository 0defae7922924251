import pytest
from conftest import REPO

from orchestrator.config.jobfile import load_spec
from orchestrator.config.plan import PlanError, make_plan, scale_lr
from orchestrator.config.spec import JobSpec
from orchestrator.train.resolve import resolve_plan


def goyal_spec(**scaling) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"arch": "resnet50", "num_classes": 1000},
        "optim": {"base_lr": 0.1, "base_batch_size": 256, "lr_scaling": "linear"},
        "schedule": {"name": "multistep", "epochs": 90, "milestones": [30, 60, 80], "warmup_epochs": 5},
        "scaling": {"num_workers": 32, "per_worker_batch_size": 256, **scaling},
    })


def test_goyal_resnet50_8k():
    plan = make_plan(goyal_spec(), num_train_samples=1_281_167, world_size=32)
    assert plan.global_batch_size == 8192
    assert plan.scaled_lr == pytest.approx(3.2)
    assert plan.steps_per_epoch == 156          # 1,281,167 // 8,192
    assert plan.dropped_samples_per_epoch == 1_281_167 - 156 * 8192 == 3215
    assert plan.warmup_steps == 780             # 5 epochs
    assert plan.total_steps == 14_040           # 90 epochs
    assert [g.lr for g in plan.param_groups] == pytest.approx([3.2, 3.2])
    assert "3.2" in plan.lr_derivation and "8192" in plan.lr_derivation


def test_shipped_imagenet_job_plans_goyal_numbers():
    spec = load_spec(REPO / "jobs" / "imagenet_8k.yaml")
    plan = resolve_plan(spec, spec.scaling.num_workers).plan
    assert (plan.global_batch_size, plan.scaled_lr, plan.steps_per_epoch, plan.warmup_steps, plan.total_steps) == \
        (8192, pytest.approx(3.2), 156, 780, 14_040)
    assert sum(g.num_params for g in plan.param_groups) == 25_557_032   # torchvision's ResNet-50


def test_accumulation_counts_in_the_global_batch():
    plan = make_plan(goyal_spec(per_worker_batch_size=64, grad_accum_steps=4), 1_281_167, 32)
    assert plan.global_batch_size == 8192
    assert plan.scaled_lr == pytest.approx(3.2)
    assert plan.steps_per_epoch == 156


@pytest.mark.parametrize("rule, expected", [("linear", 0.4), ("sqrt", 0.2), ("none", 0.1)])
def test_lr_scaling_rules(rule, expected):
    assert scale_lr(0.1, 1024, 256, rule)[0] == pytest.approx(expected)


def test_fractional_warmup_rounds_to_steps():
    spec = JobSpec.model_validate({"schedule": {"epochs": 4, "warmup_epochs": 0.5}, "scaling": {"num_workers": 1, "per_worker_batch_size": 10}})
    plan = make_plan(spec, 95, 1)
    assert (plan.steps_per_epoch, plan.warmup_steps, plan.total_steps, plan.dropped_samples_per_epoch) == (9, 4, 36, 5)


def test_too_little_data_for_one_batch():
    with pytest.raises(PlanError, match="fewer than one global batch of 8192"):
        make_plan(goyal_spec(), 1000, 32)


def test_param_groups_lr_mult_and_norm_bias_split():
    spec = JobSpec.model_validate({
        "model": {"arch": "resnet18", "num_classes": 5, "freeze": ["backbone"]},
        "optim": {"base_lr": 0.1, "base_batch_size": 64, "weight_decay": 1e-4, "norm_bias_weight_decay": 0.0,
                  "param_groups": [{"match": "fc.*", "lr_mult": 10.0}, {"match": "layer4.*", "lr_mult": 2.0, "weight_decay": 0.0}]},
        "scaling": {"num_workers": 2, "per_worker_batch_size": 32},
    })
    from orchestrator.train.resolve import count_group_sizes

    plan = make_plan(spec, 1000, 2)
    plan = plan.with_group_sizes(count_group_sizes(spec, plan.param_groups, 5))
    groups = {g.name: g for g in plan.param_groups}
    assert list(groups) == ["fc.*", "fc.* [norm/bias]", "layer4.*", "layer4.* [norm/bias]", "rest", "rest [norm/bias]"]
    assert groups["fc.*"].lr == pytest.approx(1.0) and groups["fc.*"].weight_decay == 1e-4
    assert groups["fc.* [norm/bias]"].num_params == 5 and groups["fc.* [norm/bias]"].weight_decay == 0.0
    assert groups["fc.*"].num_params == groups["fc.*"].trainable == 512 * 5
    assert groups["layer4.*"].lr == pytest.approx(0.2) and groups["layer4.*"].weight_decay == 0.0
    assert groups["layer4.*"].trainable == 0                       # backbone frozen
    assert groups["rest"].lr == pytest.approx(0.1)
    total = sum(g.num_params for g in plan.param_groups)
    assert total == 11_179_077                                     # resnet18 with a 5-class head


def test_plan_cli_json_has_the_contract_keys(capsys):
    import json

    from orchestrator.cli import main

    assert main(["plan", str(REPO / "jobs" / "quickstart.yaml"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in ("world_size", "per_worker_batch_size", "grad_accum_steps", "global_batch_size", "base_lr", "scaled_lr",
                "steps_per_epoch", "warmup_steps", "total_steps", "epochs", "param_groups"):
        assert key in plan
    for group in plan["param_groups"]:
        assert {"name", "lr", "weight_decay", "num_params", "trainable"} <= set(group)
    assert plan["num_train_samples"] == 578 and plan["global_batch_size"] == 64
