"""`orchestrator bench reliability`: kill a worker, corrupt a checkpoint, start a run twice; count what survives.

Each run of a small 2-worker job has one worker killed once in the middle of epoch 3 of 4
(`ORCHESTRATOR_FAULT_AT_STEP`); the figures are runs completed, epochs lost or repeated, and the
recovery cost in seconds against a clean run measured in the same session. Then each finished run's
latest checkpoint is cut in half and the run extended by an epoch (it must resume from the one
before and complete), and the same job is started twice at once under a new name (one must exit 2
naming the other, the other complete with a consistent run folder).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from orchestrator.bench.common import timed_train
from orchestrator.cluster.worker import FAULT_MARKER, FAULT_NODE_ENV, FAULT_STEP_ENV
from orchestrator.store.storage import CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE, RunFolder, epoch_dir_name


def reliability_job(storage: str, name: str) -> dict:
    return {
        "name": name, "seed": 0,
        "data": {"source": "builtin:digits", "classes": [0, 1, 2, 3, 4], "image_size": 16},
        "model": {"arch": "resnet18"},
        "optim": {"name": "sgd", "base_lr": 0.2, "base_batch_size": 256},
        "schedule": {"name": "cosine", "epochs": 4, "warmup_epochs": 1},
        "scaling": {"num_workers": 2, "per_worker_batch_size": 32},
        "run": {"storage": storage, "max_failures": 2},
    }


def run_outcome(run: RunFolder, exit_code: int, epochs: int) -> dict:
    """completed, killed (the fault fired), epochs lost and repeated, from a faulty run's folder."""
    done = [r["epoch"] for r in run.read_rows(METRICS_FILE)] if run.exists(METRICS_FILE) else []
    return {"completed": exit_code == 0 and run.read_json(SUMMARY_FILE)["status"] == "completed",
            "killed": run.exists(FAULT_MARKER),
            "lost": len(set(range(epochs)) - set(done)), "repeated": len(done) - len(set(done))}


def corrupt_and_extend(job_path: Path, run: RunFolder, epochs: int, env: dict) -> bool:
    """Cut the latest checkpoint of a finished run in half, train one more epoch: True when the re-run
    skips it, resumes from the one before and ends with every epoch's row exactly once."""
    latest = epoch_dir_name(epochs - 1) + "/" + CHECKPOINT_FILE
    data = run.read_bytes(latest)
    run.write_bytes(latest, data[: len(data) // 2])
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(job_path), "--set",
                           f"schedule.epochs={epochs + 1}"], capture_output=True, text=True, env={**env, "COLUMNS": "200"})
    rows = [r["epoch"] for r in run.read_rows(METRICS_FILE)] if run.exists(METRICS_FILE) else []
    return (done.returncode == 0 and "skipped" in done.stdout and f"from {epoch_dir_name(epochs - 2)}" in done.stdout
            and rows == list(range(epochs + 1)))


def start_twice(job_path: Path, run: RunFolder, epochs: int, env: dict) -> bool:
    """Start the same job twice at once: True when one exits 2 naming the other's lock and the other
    completes with each epoch's row exactly once."""
    command = [sys.executable, "-m", "orchestrator.cli", "train", str(job_path)]
    first, second = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for _ in range(2))
    errors = [p.communicate()[1] for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    refused = [err for p, err in zip((first, second), errors) if p.returncode == 2]
    rows = [r["epoch"] for r in run.read_rows(METRICS_FILE)] if run.exists(METRICS_FILE) else []
    return codes == [0, 2] and "is in use by another run" in refused[0] and rows == list(range(epochs))


def elastic_job(storage: str, name: str) -> dict:
    job = reliability_job(storage, name)
    job["scaling"].update(num_workers={"min": 1, "max": 2}, placement="spread")
    job["run"]["checkpoint_every_steps"] = 4
    job["schedule"]["epochs"] = 8   # the run outlasts the node's return and the resize back to two
    return job


def _train(job: dict, workdir: Path, env: dict, fault_step: int | None = None) -> tuple[int, float, str, float | None]:
    """Train `job` on the cluster `--address auto` finds: (exit code, seconds, its output, seconds from the
    node's loss to the run going on with one worker). With `fault_step`, the worker node is lost after that
    step (ORCHESTRATOR_FAULT_NODE); once the run has gone on with one worker, `up` starts the node again."""
    import time

    path, log = workdir / f"{job['name']}.yaml", workdir / f"{job['name']}.out"
    path.write_text(yaml.safe_dump(job))
    env = {**env, "COLUMNS": "200", **({FAULT_STEP_ENV: str(fault_step), FAULT_NODE_ENV: "1"} if fault_step is not None else {})}
    started, went_on = time.perf_counter(), None
    run = RunFolder(job["run"]["storage"], job["name"])
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(path), "--address", "auto"],
                                  stdout=out, stderr=subprocess.STDOUT, env=env)
        if fault_step is not None:
            while driver.poll() is None and "2 -> 1 workers" not in log.read_text():
                time.sleep(0.2)
            if run.exists(FAULT_MARKER):
                went_on = time.time() - run.read_json(FAULT_MARKER)["time"]
            subprocess.run([sys.executable, "-m", "orchestrator.cli", "up", "--nodes", "2"], capture_output=True, env=env)
        code = driver.wait()
    return code, time.perf_counter() - started, log.read_text(), went_on


def elastic_case(console: Console) -> dict:
    """A 2-node cluster (`up --nodes 2`): an elastic run (1 to 2 workers, 8 epochs) whose worker node is lost in
    the middle of epoch 3 and comes back, against the same run without the loss."""
    import shutil

    from orchestrator.config.jobfile import validate_spec
    from orchestrator.train.resolve import resolve_plan

    workdir = Path(tempfile.mkdtemp(prefix="oce-", dir="/tmp"))   # short: Ray's socket paths live under it
    env = {**os.environ, "ORCHESTRATOR_CLUSTER_DIR": str(workdir / "cluster")}
    storage = str(workdir / "runs")
    try:
        console.print("elastic: a 2-node cluster (orchestrator up --nodes 2) ...")
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "up", "--nodes", "2"], capture_output=True, env=env, check=True)
        plan = resolve_plan(validate_spec(elastic_job(storage, "x")), 2).plan
        fault_step = 2 * plan.steps_per_epoch + plan.steps_per_epoch // 2
        console.print("elastic: the run without a loss ...")
        code, clean_s, _, _ = _train(elastic_job(storage, "elastic_clean"), workdir, env)
        console.print(f"elastic: the worker node lost after step {fault_step}, then back ...")
        code, faulty_s, output, went_on = _train(elastic_job(storage, "elastic_lost"), workdir, env, fault_step)
        run = RunFolder(storage, "elastic_lost")
        summary = run.read_json(SUMMARY_FILE) if run.exists(SUMMARY_FILE) else {"status": "failed", "resizes": []}
        resumed = [int(step) for step in re.findall(r"resumed from \S+ \(.*?step (\d+)\)", output)]
        return {**run_outcome(run, code, plan.epochs), "recovery_s": faulty_s - clean_s, "clean_s": clean_s,
                "loss_to_training_s": went_on,
                "resizes": [(r["from"], r["to"]) for r in summary.get("resizes", [])],
                "steps_repeated": fault_step + 1 - resumed[0] if resumed else None}
    finally:
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "down"], capture_output=True, env=env)
        shutil.rmtree(workdir, ignore_errors=True)


def reliability(console: Console, runs: int = 3, elastic: bool = True) -> dict:
    """Kill one worker once in the middle of epoch 3 of 4, `runs` times; compare with a clean run."""
    from orchestrator.config.jobfile import validate_spec
    from orchestrator.train.resolve import resolve_plan

    outcomes = []
    with tempfile.TemporaryDirectory() as workdir:
        storage = str(Path(workdir) / "runs")

        def job_file(name: str) -> Path:
            path = Path(workdir) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(reliability_job(storage, name)))
            return path

        plan = resolve_plan(validate_spec(reliability_job(storage, "x")), 2).plan
        fault_step = 2 * plan.steps_per_epoch + plan.steps_per_epoch // 2
        console.print(f"clean run (baseline): {plan.epochs} epochs x {plan.steps_per_epoch} steps, 2 workers ...")
        code, clean_s = timed_train(job_file("clean"), dict(os.environ))
        if code != 0:
            raise RuntimeError("the clean baseline run failed")
        for index in range(runs):
            console.print(f"run {index + 1} of {runs}: one worker killed after step {fault_step} ...")
            code, seconds = timed_train(job_file(f"faulty_{index}"), {**os.environ, FAULT_STEP_ENV: str(fault_step)})
            outcomes.append({**run_outcome(RunFolder(storage, f"faulty_{index}"), code, plan.epochs),
                             "recovery_s": seconds - clean_s})
        for index in range(runs):
            console.print(f"run {index + 1} of {runs}: latest checkpoint corrupted, then one more epoch ...")
            outcomes[index]["corrupt_ok"] = corrupt_and_extend(job_file(f"faulty_{index}"), RunFolder(storage, f"faulty_{index}"),
                                                               plan.epochs, dict(os.environ))
            console.print(f"run {index + 1} of {runs}: the same job started twice at once ...")
            outcomes[index]["twice_ok"] = start_twice(job_file(f"twice_{index}"), RunFolder(storage, f"twice_{index}"),
                                                      plan.epochs, dict(os.environ))
    figures = {"runs": runs, "completed": sum(o["completed"] for o in outcomes), "killed": sum(o["killed"] for o in outcomes),
               "epochs_lost": sum(o["lost"] for o in outcomes), "epochs_repeated": sum(o["repeated"] for o in outcomes),
               "mean_recovery_s": statistics.mean(o["recovery_s"] for o in outcomes) if outcomes else 0.0, "clean_s": clean_s,
               "corrupt_checkpoint_recovered": sum(o["corrupt_ok"] for o in outcomes),
               "concurrent_start_one_writer": sum(o["twice_ok"] for o in outcomes)}
    if elastic:
        figures["elastic"] = elastic_case(console)
    print_reliability(console, figures, runs)
    return figures


def print_reliability(console: Console, figures: dict, runs: int) -> None:
    clean_s = figures["clean_s"]
    table = Table(title="worker kill and recovery", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in (("completed", f"{figures['completed']}/{runs} (a worker was killed in {figures['killed']})"),
                       ("epochs lost", str(figures["epochs_lost"])), ("epochs repeated", str(figures["epochs_repeated"])),
                       ("mean recovery cost", f"{figures['mean_recovery_s']:.1f} s (faulty run's wall time - clean run's, {clean_s:.1f} s)"),
                       ("corrupt latest checkpoint", f"{figures['corrupt_checkpoint_recovered']}/{runs} resumed from the one before and completed"),
                       ("started twice at once", f"{figures['concurrent_start_one_writer']}/{runs} one exited 2, one completed")):
        table.add_row(key, value)
    if "elastic" in figures:
        e = figures["elastic"]
        table.add_row("elastic: node lost and back", f"{'completed' if e['completed'] else 'FAILED'}, workers "
                      + " -> ".join(["2"] + [str(to) for _, to in e["resizes"]]) + f", {e['lost']} epochs lost, "
                      f"{e['steps_repeated']} steps repeated, training again {e['loss_to_training_s'] or 0:.1f} s after the "
                      f"loss, recovery cost {e['recovery_s']:.1f} s (clean {e['clean_s']:.1f} s)")
    console.print(table)
    console.print(f"goal: {runs}/{runs} completed, 0 lost, 0 repeated, {runs}/{runs} recovered from a corrupt checkpoint, "
                  f"{runs}/{runs} with one writer")

