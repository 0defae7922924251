"""Issue 26 on a real Ray: a TPE sweep interrupted with Ctrl-C and resumed suggests what an unbroken one
does and keeps its finished trials, nothing unpickled (the resume test of every search: they share one
searcher over sweep.json), `--extend` adds trials, several objectives mark a Pareto front, `--pick` writes
a trial's job; a PBT sweep perturbs, draws its lineage, and a perturbed trial resumes exactly."""

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import REPO, tiny_job
from test_sweep import Planted

from orchestrator.cli import main
from orchestrator.config.jobfile import load_spec

COMPARED = ("epoch", "step", "train_loss", "val_loss", "val_acc1")


def search_job(storage, name: str, **sweep) -> dict:
    job = tiny_job(storage, name, scaling={"num_workers": 1, "per_worker_batch_size": 8},
                   schedule={"name": "constant", "epochs": 2, "warmup_epochs": 0},
                   run={"storage": str(storage), "max_failures": 0, "deterministic": True})
    job["sweep"] = {"max_concurrent_trials": 1, "asha": {"grace_period": 1, "reduction_factor": 2}, **sweep}
    return job


def tpe_job(storage, name: str) -> dict:
    return search_job(storage, name, search="tpe", num_samples=4, startup_trials=2,
                      objectives=[{"metric": "val_acc1", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}],
                      space={"optim.base_lr": {"loguniform": [1e-3, 0.3]}, "optim.momentum": {"uniform": [0.5, 0.95]}})


def _state(folder) -> dict:
    return json.loads((folder / "sweep.json").read_text())


def _values(folder) -> list[dict]:
    return [t["values"] for t in _state(folder)["trials"]]


@pytest.mark.ray
@pytest.mark.slow
def test_tpe_resumed_after_ctrl_c_suggests_what_an_unbroken_sweep_does(ray_session, tmp_path, write_job, capsys):
    unbroken = tmp_path / "runs" / "tpe"
    path = write_job(tpe_job(tmp_path / "runs", "tpe"))
    assert main(["sweep", str(path)]) == 0
    rows = pq.read_table(unbroken / "results.parquet").to_pylist()
    assert len(rows) == 4 and {"best_val_acc1", "latency_ms", "pareto"} <= set(rows[0])
    assert all(r["latency_ms"] > 0 for r in rows if r["epochs_run"]) and any(r["pareto"] for r in rows)
    best = max(rows, key=lambda r: r["best_val_acc1"])
    assert best["pareto"] and "Pareto front (val_acc1, latency_ms)" in capsys.readouterr().out

    assert main(["sweep", str(path), "--extend", "2"]) == 0               # two more, TPE told the four first
    assert len(_state(unbroken)["trials"]) == 6 and all(t["status"] == "ended" for t in _state(unbroken)["trials"])
    assert len(pq.read_table(unbroken / "results.parquet").to_pylist()) == 6
    assert main(["sweep", str(path), "--pick", "trial_0005"]) == 0
    picked = load_spec(unbroken / "trial_0005.yaml")
    assert picked.optim.base_lr == _values(unbroken)[5]["optim.base_lr"] and picked.name == "tpe_trial_0005"

    broken = tmp_path / "runs" / "tpe_broken"
    path = write_job(tpe_job(tmp_path / "runs", "tpe_broken"))
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", str(path)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((broken / "sweep.json").exists() and len(_state(broken)["trials"]) >= 3):
        time.sleep(0.5)
    assert len(_state(broken)["trials"]) >= 3, "the third trial was not suggested within 5 minutes"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "--resume" in err, err[-2000:]
    assert len(_state(broken)["trials"]) < 4, "the sweep ended before the interrupt"
    finished = {p.parent.name: p.read_bytes() for p in (broken / "trials").glob("*/metrics.parquet")
                if (p.parent / "summary.json").exists()}
    assert finished, "no trial had finished before the interrupt"
    marker = tmp_path / "pwned"
    (broken / "tune").mkdir(exist_ok=True)                               # planted in shared storage: runs code if unpickled
    for name in ("searcher-state.pkl", "tuner.pkl"):
        (broken / "tune" / name).write_bytes(pickle.dumps(Planted(str(marker))))
    resumed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(path), "--resume"], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming the sweep" in resumed.stdout
    assert _values(broken) == _values(unbroken)[:4]                      # the same trials, suggested from the same results
    assert all((broken / "trials" / name / "metrics.parquet").read_bytes() == rows    # a finished trial is not run again
               for name, rows in finished.items())
    assert [t["status"] for t in _state(broken)["trials"]] == ["ended"] * 4
    assert len(pq.read_table(broken / "results.parquet").to_pylist()) == 4
    assert not marker.exists()


def pbt_job(storage, name: str) -> dict:
    job = search_job(storage, name, scheduler="pbt", num_samples=4, max_concurrent_trials=2,
                     pbt={"perturbation_interval": 1, "quantile_fraction": 0.25, "resample_probability": 0.0},
                     space={"optim.base_lr": {"loguniform": [1e-3, 0.3]}})
    job["schedule"]["epochs"] = 3
    return job


def _lr(row: dict) -> float:
    return next(v for k, v in row.items() if k.startswith("lr/"))


@pytest.mark.ray
@pytest.mark.slow
def test_pbt_perturbs_draws_its_lineage_and_a_perturbed_trial_resumes_exactly(ray_session, tmp_path, write_job, capsys):
    folder = tmp_path / "runs" / "pbt"
    path = write_job(pbt_job(tmp_path / "runs", "pbt"))
    assert main(["sweep", str(path)]) == 0
    assert "PBT after epoch 1:" in capsys.readouterr().out
    state = _state(folder)
    events = [(t["id"], e) for t in state["trials"] for e in t.get("lineage", [])]
    assert [e["epoch"] for _, e in events].count(1) == 1 and [e["epoch"] for _, e in events].count(2) == 1
    assert state["pbt_epoch"] == 2 and all(t["status"] == "ended" for t in state["trials"])
    for trial, event in events:                                          # the LR column shows the jump
        rows = pq.read_table(folder / "trials" / trial / "metrics.parquet").to_pylist()
        assert len(rows) == 3
        new_lr = event["values"]["optim.base_lr"]
        assert new_lr / event["from_values"]["optim.base_lr"] in (pytest.approx(0.8), pytest.approx(1.2))
        assert _lr(rows[event["epoch"]]) == pytest.approx(new_lr * 8 / 32)   # constant schedule, linear scaling
        assert _lr(rows[event["epoch"] - 1]) != _lr(rows[event["epoch"]])
    assert main(["report", str(folder)]) == 0
    page = (folder / "report" / "index.html").read_text()
    assert "Lineage (PBT)" in page and events[0][1]["from"] in page

    trial, event = next((t, e) for t, e in events if e["epoch"] == 2)    # killed just after its perturbation
    run = folder / "trials" / trial
    before = [{k: r[k] for k in COMPARED} | {"lr": _lr(r)} for r in pq.read_table(run / "metrics.parquet").to_pylist()]
    assert before[2]["lr"] != before[1]["lr"]
    shutil.rmtree(run / "checkpoint_epoch_0002")
    (run / "summary.json").unlink()
    pq.write_table(pq.read_table(run / "metrics.parquet").slice(0, 2), run / "metrics.parquet")
    state["trials"] = [dict(t, status="running") if t["id"] == trial else t for t in state["trials"]]
    (folder / "sweep.json").write_text(json.dumps(state))
    assert main(["sweep", str(path), "--resume"]) == 0
    after = [{k: r[k] for k in COMPARED} | {"lr": _lr(r)} for r in pq.read_table(run / "metrics.parquet").to_pylist()]
    assert after == before
