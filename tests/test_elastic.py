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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def elastic_job(storage, name: str, workers) -> dict:
    return tiny_job(storage, name, data={"source": "builtin:digits", "classes": [0, 1, 2], "max_per_class": 80,
                                         "image_size": 16},
                    schedule={"name": "cosine", "epochs": 10, "warmup_epochs": 1},
                    scaling={"num_workers": workers, "per_worker_batch_size": 8, "placement": "spread"},
                    run={"storage": str(storage), "checkpoint_every_steps": 5, "max_failures": 3})


def planned_lrs(run, rows: list[dict]) -> list[float]:
    """Each row's LRs as the run's plan and schedule give them at the row's last step, whatever the size."""
    from orchestrator.config.jobfile import load_spec
    from orchestrator.config.plan import Plan
    from orchestrator.config.schedule import group_multipliers, group_schedule
    from orchestrator.store.metrics import lr_column

    plan, spec = Plan.from_dict(json.loads((run / "plan.json").read_text())), load_spec(run / "spec.yaml")
    schedules = {g.name: group_schedule(spec.schedule, g.schedule) for g in plan.param_groups}
    expected = []
    for row in rows:
        factors = group_multipliers(row["step"] - 1, schedules, plan, ())
        by_column = {lr_column(g.name): g.lr * factors[g.name] for g in plan.param_groups}
        expected += [by_column[k] for k in row if k.startswith("lr/")]
    return expected


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    import time

    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.slow
def test_losing_a_node_keeps_the_plan_and_the_run_grows_back(ray_session, tmp_path, write_job, monkeypatch):
    """2 nodes (separate `ray start`s), 1 to 2 workers: the worker node is killed mid-epoch, the run goes on
    with one worker and the same global batch, LR and schedule; the node comes back and the run grows to two."""
    import subprocess
    import sys

    import pyarrow.parquet as pq
    from conftest import REPO

    from orchestrator.cluster import local_cluster

    import shutil
    import tempfile

    cluster_dir = tempfile.mkdtemp(prefix="oce-", dir="/tmp")            # short: Ray's socket paths live under it
    monkeypatch.setenv("ORCHESTRATOR_CLUSTER_DIR", cluster_dir)
    monkeypatch.setenv("RAY_health_check_period_ms", "1000")              # the GCS marks a lost node dead in ~3 s,
    monkeypatch.setenv("RAY_health_check_failure_threshold", "3")        # not ~15 s: a shorter test, the same path
    import time

    started = time.time()
    info, _ = local_cluster.up(nodes=2, cpus=2, gcs_port=_free_port(), dashboard_port=_free_port())
    try:
        run = tmp_path / "runs" / "elastic"
        out = open(tmp_path / "elastic.out", "w+")
        driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train",
                                   str(write_job(elastic_job(tmp_path / "runs", "elastic", {"min": 1, "max": 2}))),
                                   "--address", info.address], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _wait_for(lambda: (run / "checkpoint_step").exists() or (run / "metrics.parquet").exists(), 120, "a first checkpoint")
        print(f"first checkpoint at {time.time() - started:.0f} s")
        local_cluster.kill_node("worker-1")                                 # the machine is gone
        _wait_for(lambda: "2 -> 1 workers" in (tmp_path / "elastic.out").read_text(), 120, "the shrink to one worker")
        print(f"shrunk at {time.time() - started:.0f} s")
        local_cluster.up(nodes=2, cpus=2)                                   # it comes back
        print(f"node back at {time.time() - started:.0f} s")
        assert driver.wait(timeout=240) == 0, (tmp_path / "elastic.out").read_text()[-3000:]
        print(f"done at {time.time() - started:.0f} s")
    finally:
        local_cluster.down()
        shutil.rmtree(cluster_dir, ignore_errors=True)
    summary = json.loads((run / "summary.json").read_text())
    assert [(r["from"], r["to"]) for r in summary["resizes"]] == [(2, 1), (1, 2)], summary["resizes"]
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == list(range(10))                   # every epoch once
    assert {r["world_size"] for r in rows} == {1, 2}
    workers = json.loads((run / "workers.json").read_text())                 # the grown group: placement spread
    assert [w["rank"] for w in workers] == [0, 1] and len({w["node_id"] for w in workers}) == 2   # one per node
    plan = json.loads((run / "plan.json").read_text())
    assert plan["global_batch_size"] == 16 and plan["elastic_sizes"][0]["grad_accum_steps"] == 2
    assert [r["step"] for r in rows] == [plan["steps_per_epoch"] * (epoch + 1) for epoch in range(10)]
    assert [r[k] for r in rows for k in r if k.startswith("lr/")] == pytest.approx(planned_lrs(run, rows))   # one schedule
    assert summary["test_acc1"] > 0.8                                      # it learns (a fixed-size run: 0.94)


def test_placement_spread_or_pack():
    assert validate_spec({"scaling": {"placement": "spread"}}).scaling.ray_placement == "SPREAD"
    assert validate_spec({"scaling": {"placement_strategy": "STRICT_SPREAD"}}).scaling.ray_placement == "STRICT_SPREAD"
    with pytest.raises(SpecError, match="scaling.placement_strategy: STRICT_PACK contradicts scaling.placement spread"):
        validate_spec({"scaling": {"placement": "spread", "placement_strategy": "STRICT_PACK"}})


def test_lost_nodes_leave_the_restart_count_at_once():
    from orchestrator.cluster.elastic_policy import alive_only

    reserved = {"a": {"CPU": 1.0}, "b": {"CPU": 1.0}}
    nodes = [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": False}]
    assert alive_only(reserved, nodes) == {"a": {"CPU": 1.0}}
    assert alive_only(None, nodes) is None and alive_only({}, nodes) == {}
