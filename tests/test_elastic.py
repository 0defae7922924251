"""Issue 27: an elastic worker count keeps the plan: the global batch, LR, steps and schedule are the same at
every size in [min, max]; the per-worker batch and accumulation are re-derived (the plan lists them)."""

import json

import pytest
from conftest import tiny_job

from orchestrator.cli import main
from orchestrator.config.errors import SpecError
from orchestrator.config.jobfile import validate_spec
from orchestrator.config.plan import PlanError, make_plan


def elastic(low: int, high: int, per_worker: int = 8, accum: int = 1):
    return validate_spec({"scaling": {"num_workers": {"min": low, "max": high}, "per_worker_batch_size": per_worker,
                                      "grad_accum_steps": accum}})


def test_every_size_keeps_the_global_batch_lr_and_steps():
    plan = make_plan(elastic(1, 3), 1000, 3)
    assert plan.elastic_sizes == [{"world_size": 1, "per_worker_batch_size": 8, "grad_accum_steps": 3},
                                  {"world_size": 2, "per_worker_batch_size": 6, "grad_accum_steps": 2},
                                  {"world_size": 3, "per_worker_batch_size": 8, "grad_accum_steps": 1}]
    for row in plan.elastic_sizes:
        smaller = plan.for_world_size(row["world_size"])
        assert smaller.per_worker_batch_size * smaller.world_size * smaller.grad_accum_steps == plan.global_batch_size == 24
        assert (smaller.scaled_lr, smaller.steps_per_epoch, smaller.warmup_steps, smaller.total_steps) == (
            plan.scaled_lr, plan.steps_per_epoch, plan.warmup_steps, plan.total_steps)
    assert "2 -> 1 workers: per-worker batch 6 -> 8, grad accumulation 2 -> 3; kept: global batch 24" in \
        plan.for_world_size(2).resize_line(plan.for_world_size(1))
    with pytest.raises(PlanError, match="no row for 4 workers"):
        plan.for_world_size(4)
    assert make_plan(validate_spec({"scaling": {"num_workers": 2}}), 1000, 2).elastic_sizes is None


def test_a_size_that_cannot_reach_the_global_batch_is_named():
    with pytest.raises(PlanError) as info:
        make_plan(elastic(2, 4), 1000, 4)                       # 32 images over 3 workers
    assert "cannot be split evenly over 3 worker(s); sizes that can: 1, 2, 4" in str(info.value)


@pytest.mark.parametrize("workers, message", [
    ({"min": 3, "max": 2}, "scaling.num_workers.max: max 2 is below min 3"),
    ({"min": 1}, "scaling.num_workers.max: required key is missing"),
    ({"min": 1, "max": 2, "most": 3}, "scaling.num_workers.most: unknown key"),
    (0, "scaling.num_workers: must be >= 1 (got 0)"),
])
def test_bad_worker_counts_name_the_key(workers, message):
    with pytest.raises(SpecError) as info:
        validate_spec({"scaling": {"num_workers": workers}})
    assert [p for p in info.value.problems if message in p] and len(info.value.problems) == 1, info.value.problems


def test_plan_lists_the_sizes(tmp_path, write_job, capsys):
    job = tiny_job(tmp_path, "elastic", scaling={"num_workers": {"min": 1, "max": 2}, "per_worker_batch_size": 8})
    path = write_job(job)
    assert main(["plan", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["elastic_sizes"] == [{"world_size": 1, "per_worker_batch_size": 8, "grad_accum_steps": 2},
                                     {"world_size": 2, "per_worker_batch_size": 8, "grad_accum_steps": 1}]
    assert plan["world_size"] == 2 and plan["global_batch_size"] == 16
    assert main(["plan", str(path)]) == 0
    assert "1 to 2 workers, the global batch kept" in " ".join(capsys.readouterr().out.split())
    job["scaling"]["num_workers"] = {"min": 2, "max": 4}
    assert main(["plan", str(write_job(job))]) == 2
    assert "cannot be split evenly over 3 worker(s)" in capsys.readouterr().err
