"""Issue 4: DDP equivalence, exact resume, worker failure, Ctrl-C, divergence, storage URIs."""

import json
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, tiny_job

from orchestrator.cli import main
from orchestrator.cluster.launch import local_env
from orchestrator.config.jobfile import validate_spec
from orchestrator.train.fit import fit
from orchestrator.train.resolve import resolve_plan

TIMING = {"images_per_s", "train_s", "data_wait_s", "val_s", "epoch_s", "wall_s"}


class StopRun(Exception):
    pass


def run_fit(job: dict, stop_after_epoch: int | None = None, stop_after_step: int | None = None) -> dict:
    """fit() in-process as --local does; optionally 'crash' right after an epoch's checkpoint is written, or
    right after an optimizer step."""
    spec = validate_spec(job)
    plan = resolve_plan(spec, 1).plan
    env = local_env(spec, emit=lambda event: None)
    if stop_after_step is not None:
        def crash(step: int) -> None:
            if step == stop_after_step:
                raise StopRun

        env.step_hook = crash
    if stop_after_epoch is not None:
        report = env.report

        def report_then_stop(row, data, epoch):
            report(row, data, epoch)
            if epoch == stop_after_epoch:
                raise StopRun

        env.report = report_then_stop
    return fit(spec, plan, env)


def final_weights(run) -> dict:
    return torch.load(sorted(run.glob("checkpoint_epoch_*"))[-1] / "checkpoint.pt", weights_only=True)["model"]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.parametrize("case, sections, stop_after", [
    ("inside_warmup", {"schedule": {"epochs": 3, "warmup_epochs": 1.5}}, 0),
    ("before_unfreeze", {"schedule": {"epochs": 4, "warmup_epochs": 1}, "model": {"arch": "resnet18", "freeze": ["backbone"], "unfreeze_at_epoch": 3},
                         "optim": {"name": "adam", "base_lr": 0.001, "base_batch_size": 32}}, 1),
    ("swats_plateau", {"schedule": {"name": "plateau", "epochs": 4, "patience": 0}, "optim": {"name": "adam", "base_lr": 0.001,
                       "base_batch_size": 32, "switch_to_sgd_at_epoch": 2}, "data": {"augment": ["hflip", "random_crop"]}}, 2),
    ("gradual_unfreeze_group_schedule", {
        "schedule": {"name": "onecycle", "epochs": 4, "warmup_epochs": 0},
        "model": {"arch": "resnet18", "freeze": ["layer*"], "train_bn": False,
                  "unfreeze": [{"at_epoch": 1, "modules": ["layer4"]}, {"at_epoch": 3, "modules": ["*"]}]},
        "optim": {"name": "sgd", "base_lr": 0.05, "base_batch_size": 32,
                  "param_groups": [{"match": "layer*", "schedule": {"name": "lambda", "expression": "0.5 ** epoch"}}]},
        "data": {"augment": [{"name": "rotate", "degrees": 10}, "gaussian_noise"]}}, 1),
    ("layer_decay_drop_path", {          # issue 25: per-depth LRs and stochastic depth's draws survive a resume
        "schedule": {"epochs": 3, "warmup_epochs": 1}, "data": {"image_size": 32},
        "model": {"arch": "timm/test_convnext", "drop_path_rate": 0.2},
        "optim": {"name": "adamw", "base_lr": 0.002, "base_batch_size": 32, "layer_decay": 0.6,
                  "param_groups": [{"match": "head.*", "lr_mult": 5}]}}, 0),
])
def test_resumed_run_ends_bitwise_equal_to_an_unbroken_one(tmp_path, case, sections, stop_after):
    base = {"scaling": {"num_workers": 1, "per_worker_batch_size": 8}, "run": {"deterministic": True}}
    unbroken = tiny_job(tmp_path / "a", case, **base, **sections)
    broken = tiny_job(tmp_path / "b", case, **base, **sections)
    run_fit(unbroken)
    with pytest.raises(StopRun):
        run_fit(broken, stop_after_epoch=stop_after)
    assert len(list((tmp_path / "b" / case).glob("checkpoint_epoch_*"))) >= 1
    summary = run_fit(broken)
    assert summary["status"] == "completed"
    a, b = final_weights(tmp_path / "a" / case), final_weights(tmp_path / "b" / case)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_a = pq.read_table(tmp_path / "a" / case / "metrics.parquet").to_pylist()
    rows_b = pq.read_table(tmp_path / "b" / case / "metrics.parquet").to_pylist()
    assert without_timing(rows_a) == without_timing(rows_b)


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    job = tiny_job(tmp_path, "nan", scaling={"num_workers": 1, "per_worker_batch_size": 8}, schedule={"epochs": 3})
    with pytest.raises(StopRun):
        run_fit(job, stop_after_epoch=0)
    before = (tmp_path / "nan" / "checkpoint_epoch_0000" / "checkpoint.pt").read_bytes()
    job["optim"]["base_lr"] = 1.0e8            # the resumed run blows up in epoch 1
    summary = run_fit(job)
    assert summary["status"] == "diverged" and "at epoch 1, step" in summary["message"]
    run = tmp_path / "nan"
    assert sorted(p.name for p in run.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0000"]
    assert (run / "checkpoint_epoch_0000" / "checkpoint.pt").read_bytes() == before
    assert [r["epoch"] for r in pq.read_table(run / "metrics.parquet").to_pylist()] == [0]


def test_file_uri_storage(tmp_path, write_job):
    job = write_job(tiny_job(f"file://{tmp_path / 'store'}", "uri", scaling={"num_workers": 1}))
    assert main(["train", str(job), "--local"]) == 0
    run = tmp_path / "store" / "uri"
    assert (run / "summary.json").is_file() and (run / "metrics.parquet").is_file()
    assert main(["train", str(job), "--local", "--set", "schedule.epochs=3"]) == 0
    assert [r["epoch"] for r in pq.read_table(run / "metrics.parquet").to_pylist()] == [0, 1, 2]


@pytest.mark.ray
def test_two_workers_compute_what_one_worker_with_the_global_batch_does(ray_session, tmp_path, write_job):
    """squeezenet has no BatchNorm; with dropout 0 nothing depends on how the batch is split."""
    common = {"model": {"arch": "squeezenet1_1", "dropout": 0.0, "head_init": "default"}, "data": {"augment": [], "image_size": 32},
              "optim": {"name": "sgd", "base_lr": 0.01, "base_batch_size": 16, "momentum": 0.9, "weight_decay": 1e-4},
              "schedule": {"name": "constant", "epochs": 1, "warmup_epochs": 0}}
    two = write_job(tiny_job(tmp_path / "runs", "two", **common, scaling={"num_workers": 2, "per_worker_batch_size": 8}), "two.yaml")
    one = write_job(tiny_job(tmp_path / "runs", "one", **common, scaling={"num_workers": 1, "per_worker_batch_size": 16}), "one.yaml")
    assert main(["train", str(two)]) == 0
    assert main(["train", str(one), "--local"]) == 0                   # the same loop without Ray or DDP
    a, b = final_weights(tmp_path / "runs" / "two"), final_weights(tmp_path / "runs" / "one")
    steps = json.loads((tmp_path / "runs" / "two" / "plan.json").read_text())["steps_per_epoch"]
    assert steps == 4
    rows = [pq.read_table(tmp_path / "runs" / n / "metrics.parquet").to_pylist()[0] for n in ("two", "one")]
    assert rows[0]["train_loss"] < 1.2                               # trained sanely (3 classes: ln 3 = 1.10 at chance)
    assert rows[0]["train_loss"] == pytest.approx(rows[1]["train_loss"], rel=1e-5)
    for name in a:
        scale = b[name].abs().max().clamp_min(1e-12)
        assert ((a[name] - b[name]).abs().max() / scale) < 1e-5, name


@pytest.mark.ray
def test_a_killed_worker_is_replaced_and_no_epoch_is_lost_or_repeated(ray_session, tmp_path, write_job, monkeypatch):
    job = write_job(tiny_job(tmp_path / "runs", "faulty", schedule={"epochs": 3, "warmup_epochs": 0.5},
                             run={"storage": str(tmp_path / "runs"), "max_failures": 1}))
    monkeypatch.setenv("ORCHESTRATOR_FAULT_AT_STEP", "5")    # inside epoch 1 (4 steps per epoch)
    assert main(["train", str(job)]) == 0
    run = tmp_path / "runs" / "faulty"
    marker = json.loads((run / "fault_injected.json").read_text())
    assert marker["step"] == 5 and marker["rank"] == 1
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def _ray_processes() -> int:
    return int(subprocess.run("pgrep -c -f 'ray/core/src/ray/raylet/raylet' || true", shell=True,
                              capture_output=True, text=True).stdout.strip() or 0)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_workers_and_a_rerun_resumes(tmp_path, write_job, signum, code):
    job = write_job(tiny_job(tmp_path / "runs", "interrupt", schedule={"epochs": 12, "warmup_epochs": 1}))
    run = tmp_path / "runs" / "interrupt"
    raylets_before = _ray_processes()
    process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(job)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not list(run.glob("checkpoint_epoch_0001")) and time.time() < deadline:
        time.sleep(0.5)
    assert list(run.glob("checkpoint_epoch_0001")), "no checkpoint within 3 minutes"
    process.send_signal(signum)
    out, err = process.communicate(timeout=90)
    assert process.returncode == code, err[-2000:]
    assert "re-run the same command to resume" in err
    time.sleep(2)
    assert _ray_processes() == raylets_before              # the Ray it started is gone
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    done = [r["epoch"] for r in rows]
    assert done == list(range(len(done))) and len(done) >= 1   # rows never run ahead of the checkpoints
    if signum == signal.SIGTERM:
        return                                                 # the resume is the same after either signal
    resumed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(job), "--local"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout
    assert [r["epoch"] for r in pq.read_table(run / "metrics.parquet").to_pylist()] == list(range(12))
