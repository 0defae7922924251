"""Issue 22.3-5: submitting from any Python, listings that survive a pipe and a narrow terminal, and a
first-step figure on a clock that does not step."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, run_in_terminal

from orchestrator.train import progress

LONG_NAME = "quickstart-resnet18-lr0.01-batch256-cosine-warmup5"


def write_runs(storage: Path) -> None:
    for name, status in ((LONG_NAME, "completed"), ("rt", "failed")):
        (storage / name).mkdir(parents=True)
        (storage / name / "summary.json").write_text(json.dumps({
            "status": status, "epochs": 8, "best_val_acc1": 0.8125, "test_acc1": 0.79, "wall_s": 61.0}))


def test_runs_never_fold_a_name_piped_or_in_a_narrow_terminal(tmp_path):
    write_runs(tmp_path / "runs")
    command = [sys.executable, "-m", "orchestrator.cli", "runs", str(tmp_path / "runs")]
    piped = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "40"})
    lines = piped.stdout.splitlines()
    assert piped.returncode == 0 and "…" not in piped.stdout
    assert any(line.startswith(LONG_NAME) and "completed" in line for line in lines)      # one row per line
    assert any(line.split()[:2] == ["rt", "failed"] for line in lines)
    shown = run_in_terminal(command, columns=40)
    assert LONG_NAME in shown and "…" not in shown
    assert "left out for the terminal's width" in shown
    listed = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120).stdout)
    assert {row["name"] for row in listed} == {LONG_NAME, "rt"}


def test_a_python_without_orchestrators_packages_fails_at_once_in_one_line(tmp_path, write_job):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    job = write_job({"name": "x"})
    started = time.monotonic()
    done = subprocess.run([str(tmp_path / "bare" / "bin" / "python"), "-m", "orchestrator.cli", "train", str(job)],
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    elapsed_s = time.monotonic() - started
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert "lacks rich, pydantic, yaml" in done.stderr and "cluster/Dockerfile" in done.stderr
    assert elapsed_s < 30            # not a timing test: it must not get as far as importing anything heavy


def test_up_puts_its_own_python_first_on_the_nodes_path():
    from orchestrator.cluster.local_cluster import ray_env

    env = ray_env()
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["RAY_AUTH_MODE"] == "token"


def test_the_first_step_figure_ignores_a_wall_clock_step(monkeypatch):
    before = progress.seconds_since_process_start(progress.boot_clock())
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)      # NTP or a user sets the clock an hour on
    view = progress.ProgressView(progress.Console(file=open(os.devnull, "w")))
    view.handle(progress.EpochStart(epoch=0, epochs=1, steps=1))
    view.handle(progress.Step(epoch=0, done=1, steps=1, loss=1.0, lr=0.1, images_per_s=1.0))
    after = progress.seconds_since_process_start(view.first_step_at)
    assert 0 <= after - before < 5


def test_a_fresh_process_measures_its_own_age_from_its_start():
    done = subprocess.run([sys.executable, "-c", "from orchestrator.train.progress import boot_clock, "
                           "seconds_since_process_start as s; print(s(boot_clock()))"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert 0 < float(done.stdout) < 30
