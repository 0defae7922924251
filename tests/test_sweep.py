"""A tiny real ASHA sweep: one-worker trials run the loop in their Tune actor, wider ones are TorchTrainer
runs; weak ones are stopped; nothing leaks."""

import json
import time

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_job

from orchestrator.cli import main
from orchestrator.config.errors import SpecError
from orchestrator.config.jobfile import load_spec
from orchestrator.config.search import probe_values, validate_space


def sweep_job(storage, name: str) -> dict:
    job = tiny_job(storage, name, scaling={"num_workers": 1, "per_worker_batch_size": 8},
                   schedule={"name": "constant", "epochs": 3, "warmup_epochs": 0}, run={"storage": str(storage), "max_failures": 0})
    # good learning rates first: when the bad ones reach the first rung, ASHA has good ones to compare with
    job["sweep"] = {"metric": "val_acc1", "mode": "max", "num_samples": 1, "max_concurrent_trials": 2,
                    "asha": {"grace_period": 1, "reduction_factor": 2},
                    "space": {"optim.base_lr": {"grid": [0.05, 0.04, 1.0e-7, 1.0e-7]}}}
    return job


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_weak_trials_and_best_yaml_trains_the_best(ray_session, tmp_path, write_job, capsys):
    job = write_job(sweep_job(tmp_path / "runs", "tiny_sweep"))
    assert main(["sweep", str(job)]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "tiny_sweep"
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert len(rows) == 4
    assert {"trial_id", "optim.base_lr", "epochs_run", "best_val_acc1", "status"} <= set(rows[0])
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(r["epochs_run"] < 3 for r in stopped)
    assert any(r["status"] == "completed" and r["epochs_run"] == 3 for r in rows)
    best_row = max(rows, key=lambda r: r["best_val_acc1"])
    best = load_spec(folder / "best.yaml")                          # a complete, valid job file
    assert best.optim.base_lr == best_row["optim.base_lr"] and best.name == "tiny_sweep_best"
    assert f"val_acc1 {best_row['best_val_acc1']:.4f}" in (folder / "best.yaml").read_text()
    trial_rows = pq.read_table(folder / "trials" / best_row["trial_id"] / "metrics.parquet").to_pylist()
    assert max(r["val_acc1"] for r in trial_rows) == best_row["best_val_acc1"]
    completed = [r for r in rows if r["status"] == "completed"]
    for row in completed:                            # the last epoch is reported after the summary is written
        summary = json.loads((folder / "trials" / row["trial_id"] / "summary.json").read_text())
        assert summary["epochs_completed"] == 3 and summary["test_acc1"] is not None
        assert not (folder / "trials" / row["trial_id"] / "workers.json").exists()   # no TorchTrainer: the loop ran in the trial
    assert "ASHA used" in out and "epochs of the 12" in out

    # after the sweep (issue 14): `runs` shows it with its trials and best; `report` draws every trial
    assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["kind"], r["status"], r["trials"]) for r in listed] == [("tiny_sweep", "sweep", "completed", 4)]
    assert listed[0]["best_trial"] == best_row["trial_id"] and listed[0]["best"] == best_row["best_val_acc1"]
    assert main(["report", str(folder)]) == 0
    page = (folder / "report" / "index.html").read_text()
    assert (folder / "report" / "trials.png").is_file() and page.count("data:image/png;base64,") == 1
    assert all(r["trial_id"] in page for r in rows) and "stopped early" in page
    deadline = time.time() + 30                                      # no placement group left holding CPUs
    while ray_session.available_resources().get("CPU", 0) < ray_session.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(1)
    assert ray_session.available_resources().get("CPU", 0) == ray_session.cluster_resources()["CPU"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_of_several_workers_is_a_torchtrainer_run(ray_session, tmp_path, write_job):
    job = sweep_job(tmp_path / "runs", "wide")
    job["scaling"]["num_workers"] = 2
    job["schedule"]["epochs"] = 1
    job["sweep"].update(max_concurrent_trials=1, space={"optim.base_lr": {"grid": [0.05]}})
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"           # issue 25: the sweep a parent MLflow run, the trial its child
    job["run"]["mlflow"] = {"tracking_uri": tracking, "experiment": "sweeps"}
    from mlflow import MlflowClient   # artifacts in tmp_path: an sqlite store puts them in ./mlruns of the cwd otherwise

    MlflowClient(tracking).create_experiment("sweeps", artifact_location=(tmp_path / "artifacts").as_uri())
    assert main(["sweep", str(write_job(job))]) == 0
    folder = tmp_path / "runs" / "wide"
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert [(r["status"], r["epochs_run"]) for r in rows] == [("completed", 1)]
    placement = json.loads((folder / "trials" / rows[0]["trial_id"] / "workers.json").read_text())
    assert [w["rank"] for w in placement] == [0, 1]                 # two Ray Train workers, DDP
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])}
    assert set(runs) == {"wide", rows[0]["trial_id"]}
    child = runs[rows[0]["trial_id"]]
    assert child.data.tags["mlflow.parentRunId"] == runs["wide"].info.run_id and "val_acc1" in child.data.metrics
    assert runs["wide"].info.status == "FINISHED" and {"best.yaml", "results.parquet"} <= {
        a.path for a in client.list_artifacts(runs["wide"].info.run_id)}


def test_space_is_validated_before_anything_runs(tmp_path, write_job, capsys):
    job = sweep_job(tmp_path, "bad")
    job["sweep"]["space"] = {"scaling.per_worker_batch_size": {"choice": [8, 0]}, "schedule.name": {"choice": ["cosine", "linear"]}}
    path = write_job(job)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "scaling.per_worker_batch_size=0" in err and "must be >= 1" in err
    assert "schedule.name: unknown value 'linear'" in err


def test_probe_values_cover_choices_and_range_ends():
    probes = probe_values({"a": {"loguniform": [1e-4, 1e-1]}, "b": {"choice": ["x", "y"]}})
    assert {(p["a"], p["b"]) for p in probes} == {(1e-4, "x"), (1e-4, "y"), (1e-1, "x"), (1e-1, "y")}


def test_shipped_sweep_job_space_is_valid():
    from conftest import REPO

    raw = yaml.safe_load((REPO / "jobs" / "quickstart_sweep.yaml").read_text())
    validate_space(raw)
    with pytest.raises(SpecError):
        raw["sweep"]["space"]["optim.name"] = {"choice": ["sgd", "lion"]}
        validate_space(raw)


class Planted:
    """A pickle that creates a file when loaded (any code could run instead)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
