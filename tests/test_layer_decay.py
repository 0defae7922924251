"""Issue 25, item 2: optim.layer_decay (per-depth LRs from the head down) and model.drop_path_rate."""

import pyarrow.parquet as pq
import pytest
from conftest import tiny_job

from orchestrator.cli import main
from orchestrator.config.jobfile import validate_spec
from orchestrator.config.plan import plan_groups
from orchestrator.config.spec import ModelSpec
from orchestrator.train.layer_decay import layer_ids
from orchestrator.train.models import ModelError, build_model, build_on_meta
from orchestrator.train.optim import build_optimizer
from orchestrator.train.resolve import resolve_plan


@pytest.mark.parametrize("arch, size, first, last, layers", [
    ("resnet18", 32, ["conv1.weight", "bn1.weight"], ["fc.weight"], 6),                    # stem, 4 stages, head
    ("vit_b_16", 224, ["class_token", "conv_proj.weight", "encoder.pos_embedding"], ["heads.head.weight"], 15),
    ("convnext_tiny", 32, ["features.0.0.weight"], ["classifier.2.weight"], 9),
    ("timm/test_vit", 32, ["cls_token", "patch_embed.proj.weight"], ["head.weight"], 8),  # timm's own group_matcher
])
def test_every_parameter_has_a_depth_from_the_stem_to_the_head(arch, size, first, last, layers):
    depth, num_layers = layer_ids(build_on_meta(arch, 5, size))
    assert num_layers == layers
    assert {depth[name] for name in first} == {0} and {depth[name] for name in last} == {num_layers - 1}
    assert sorted(set(depth.values())) == list(range(num_layers))


def test_layer_decay_scales_each_depth_and_composes_with_lr_mult():
    spec = validate_spec({"model": {"arch": "resnet18"}, "optim": {"layer_decay": 0.5, "weight_decay": 1e-4,
                          "param_groups": [{"match": "fc.*", "lr_mult": 10}]}})
    groups = plan_groups(spec, scaled_lr=0.1, num_layers=6)
    lrs = {g.name: g.lr for g in groups}
    assert lrs["rest [layer 0]"] == pytest.approx(0.1 * 0.5 ** 5) and lrs["rest [layer 5]"] == pytest.approx(0.1)
    assert lrs["fc.* [layer 5]"] == pytest.approx(1.0) and lrs["rest [layer 3] [norm/bias]"] == pytest.approx(0.1 * 0.25)
    model = build_model(spec.model, 5, 32).model
    optimizer = build_optimizer(model, groups, spec.optim)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert group_of[id(params["conv1.weight"])]["name"] == "rest [layer 0]"
    assert group_of[id(params["layer3.0.bn1.bias"])]["name"] == "rest [layer 3] [norm/bias]"
    assert group_of[id(params["fc.weight"])]["name"] == "fc.* [layer 5]"
    assert group_of[id(params["layer4.1.conv2.weight"])]["lr"] == pytest.approx(0.05)


def test_the_plan_shows_the_depth_groups_with_their_sizes(tmp_path):
    spec = validate_spec(tiny_job(tmp_path, "ld", optim={"layer_decay": 0.7}, scaling={"num_workers": 1}))
    plan = resolve_plan(spec, 1).plan
    sized = {g.name: g.num_params for g in plan.param_groups}
    assert sized["rest [layer 0]"] == 64 * 3 * 7 * 7 and sized["rest [layer 5]"] == 512 * 3
    assert sum(sized.values()) == sum(p.numel() for p in build_on_meta("resnet18", 3, 16).parameters())


def test_a_run_logs_each_depths_lr_through_the_schedule(tmp_path, write_job):
    job = write_job(tiny_job(tmp_path / "runs", "ldrun", optim={"layer_decay": 0.5}, scaling={"num_workers": 1},
                             schedule={"epochs": 2, "warmup_epochs": 0}))
    assert main(["train", str(job), "--local"]) == 0
    for row in pq.read_table(tmp_path / "runs" / "ldrun" / "metrics.parquet").to_pylist():
        assert row["lr/rest [layer 0]"] == pytest.approx(row["lr/rest [layer 5]"] * 0.5 ** 5)


@pytest.mark.parametrize("arch, modules", [("convnext_tiny", "StochasticDepth"), ("timm/test_vit", "DropPath")])
def test_drop_path_rate_reaches_the_models_that_have_it(arch, modules):
    model = build_model(ModelSpec(arch=arch, drop_path_rate=0.3), 5, 32).model
    rates = [getattr(m, "p", getattr(m, "drop_prob", None)) for m in model.modules() if type(m).__name__ == modules]
    assert rates and max(rates) == pytest.approx(0.3)


def test_drop_path_rate_on_a_model_without_it_names_the_key_and_the_ones_with(tmp_path, write_job, capsys):
    with pytest.raises(ModelError, match=r"model.drop_path_rate: resnet18 has no stochastic depth; .*convnext_\*"):
        build_model(ModelSpec(arch="resnet18", drop_path_rate=0.1), 5, 32)
    job = write_job(tiny_job(tmp_path, "dp", model={"drop_path_rate": 0.1}))
    assert main(["plan", str(job), "--local"]) == 2
    assert "model.drop_path_rate: resnet18 has no stochastic depth" in capsys.readouterr().err


def test_layer_decay_must_be_a_fraction():
    from orchestrator.config.errors import SpecError

    with pytest.raises(SpecError, match="optim.layer_decay"):
        validate_spec({"optim": {"layer_decay": 1.5}})
