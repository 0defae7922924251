import pytest
import torch

from orchestrator.config.plan import plan_groups
from orchestrator.config.spec import JobSpec
from orchestrator.train.models import build_model
from orchestrator.train.optim import OPTIMIZERS, SwatsTracker, build_optimizer, rebuild_keeping_state, switch_to_sgd


def spec_with(**optim):
    return JobSpec.model_validate({"model": {"arch": "resnet18"}, "optim": optim})


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps_over_grouped_params(name):
    spec = spec_with(name=name, param_groups=[{"match": "fc.*", "lr_mult": 10.0}])
    model = build_model(spec.model, 3, 32).model
    optimizer = build_optimizer(model, plan_groups(spec, scaled_lr=0.01), spec.optim)
    assert [g["name"] for g in optimizer.param_groups] == ["fc.*", "fc.* [norm/bias]", "rest", "rest [norm/bias]"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0, 1e-4, 0.0]
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()


def test_nesterov_and_momentum_reach_sgd():
    spec = spec_with(name="sgd", momentum=0.8, nesterov=True, norm_bias_weight_decay=None)
    optimizer = build_optimizer(build_model(spec.model, 3, 32).model, plan_groups(spec, 0.1), spec.optim)
    assert optimizer.defaults["nesterov"] is True and optimizer.defaults["momentum"] == 0.8
    assert [g["name"] for g in optimizer.param_groups] == ["rest"]      # no norm/bias split when decays agree


def test_unfreezing_rebuilds_the_optimizer_and_keeps_state():
    spec = JobSpec.model_validate({"model": {"arch": "resnet18", "freeze": ["backbone"], "unfreeze_at_epoch": 1}, "optim": {"name": "adam"}})
    model = build_model(spec.model, 3, 32).model
    optimizer = build_optimizer(model, plan_groups(spec, 0.01), spec.optim)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    head_state = optimizer.state[model.fc.weight]["exp_avg"].clone()
    for param in model.parameters():
        param.requires_grad_(True)
    rebuilt = rebuild_keeping_state(optimizer, model, plan_groups(spec, 0.01), spec.optim)
    assert sum(len(g["params"]) for g in rebuilt.param_groups) == len(list(model.parameters()))
    assert torch.equal(rebuilt.state[model.fc.weight]["exp_avg"], head_state)


def test_swats_switches_adam_to_sgd_with_the_estimated_lr():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    spec = JobSpec.model_validate({"optim": {"name": "adam", "betas": [0.9, 0.999], "weight_decay": 0.0, "norm_bias_weight_decay": None,
                                             "switch_to_sgd_at_epoch": 1}, "schedule": {"epochs": 3}})
    adam = build_optimizer(model, plan_groups(spec, scaled_lr=0.01), spec.optim)
    tracker = SwatsTracker(beta2=0.999)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    for _ in range(20):
        adam.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        tracker.before_step(adam)
        adam.step()
        tracker.after_step(adam)
    estimate = tracker.sgd_lr("rest")
    assert estimate is not None and estimate > 0
    sgd = switch_to_sgd(adam, tracker, spec.optim, multiplier_now=0.5)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    group = sgd.param_groups[0]
    assert group["lr"] == pytest.approx(0.1 * estimate)            # (1 - beta1) x estimate
    assert group["base_lr"] == pytest.approx(0.1 * estimate / 0.5)  # the schedule goes on from the switch
    restored = SwatsTracker(0.999)
    restored.load_state_dict(tracker.state_dict())
    assert restored.sgd_lr("rest") == estimate
