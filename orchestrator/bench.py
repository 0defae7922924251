"""`orchestrator bench overhead`: what our Ray Train path costs over a plain PyTorch loop.

Same model, data and batch on one worker that owns the whole machine. Steady state: median
seconds per training epoch (the first epoch left out) of a plain loop written here, of
`train --local` and of `train` on Ray Train, as ratios to the plain loop. Start-up: seconds from
command start to the first training step of `orchestrator train`, cold (a new local Ray) and
against an already running cluster (`--address`), next to a bare TorchTrainer whose loop does
nothing (Ray's own floor), all measured in this run. Each measured command runs in a fresh process.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from orchestrator.launch import process_start_time
from orchestrator.storage import METRICS_FILE, SUMMARY_FILE

FIRST_STEP_PATTERN = re.compile(r"first training step ([0-9.]+) s after the command started")
BARE_PATTERN = re.compile(r"bare first step ([0-9.]+) s")


def bench_job(storage: str, name: str, epochs: int) -> dict:
    cpus = os.cpu_count() or 1
    return {
        "name": name, "seed": 0,
        "data": {"source": "builtin:digits", "image_size": 32, "augment": ["random_crop"], "loader_workers": 0},
        "model": {"arch": "resnet18"},
        "optim": {"name": "sgd", "base_lr": 0.2, "base_batch_size": 256},
        "schedule": {"name": "cosine", "epochs": epochs, "warmup_epochs": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": cpus, "per_worker_batch_size": 64},
        "run": {"storage": storage, "max_failures": 0},
    }


def plain_loop_epoch_seconds(job: dict, epochs: int) -> list[float]:
    """A plain PyTorch loop over the same data pipeline, model and batch: seconds per epoch."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from orchestrator.data import load_splits, make_dataset
    from orchestrator.spec import JobSpec

    spec = JobSpec.model_validate(job)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    splits = load_splits(spec.data, spec.seed)
    dataset = make_dataset(splits.train, spec.data, True, "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec.scaling.per_worker_batch_size, shuffle=True, drop_last=True)
    model = torchvision.models.resnet18(num_classes=splits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    seconds = []
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    return seconds


def run_train(job_path: Path, extra: list[str], env: dict | None = None) -> tuple[float, list[float]]:
    """(seconds to first step, train seconds per epoch) of `orchestrator train` in a fresh process."""
    command = [sys.executable, "-m", "orchestrator.cli", "train", str(job_path), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env={**(env or os.environ), "COLUMNS": "200"})
    match = FIRST_STEP_PATTERN.search(done.stdout)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    job = yaml.safe_load(job_path.read_text())
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(job["run"]["storage"]) / job["name"] / METRICS_FILE).to_pylist()
    return float(match.group(1)), [r["train_s"] for r in rows]


def run_bare(address: str | None, env: dict | None = None) -> float:
    command = [sys.executable, "-m", "orchestrator.bench", "bare"] + ([address] if address else [])
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    match = BARE_PATTERN.search(done.stdout)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"bare TorchTrainer failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return float(match.group(1))


def bare_trainer_main(address: str | None) -> None:
    """Ray's floor: import torch, start or join Ray, fit a 1-worker TorchTrainer whose loop does nothing."""
    import torch  # noqa: F401  (our CLI pays for it too)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    events = Queue()

    def loop(config):
        config["queue"].put(time.time())

    with tempfile.TemporaryDirectory() as storage:
        TorchTrainer(loop, train_loop_config={"queue": events},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": os.cpu_count() or 1}),
                     run_config=RunConfig(storage_path=storage, name="bare")).fit()
    print(f"bare first step {events.get(timeout=60) - process_start_time():.2f} s", flush=True)


def token_env() -> dict:
    """Environment for a token-protected local head and its clients (a token is made if none exists)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    if not (Path.home() / ".ray" / "auth_token").is_file() and "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_TOKEN_PATH" not in env:
        subprocess.run(["ray", "get-auth-token", "--generate"], capture_output=True, check=True, env=env)
    return env


def start_head(num_cpus: int, env: dict) -> tuple[subprocess.Popen, str]:
    """A local `ray start --head --block` on loopback and a free port; returns (process, address)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp_dir = tempfile.mkdtemp(prefix="ray-bench-")
    process = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=false",
         "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        probe = subprocess.run(["ray", "status", f"--address={address}"], capture_output=True, text=True, env=env)
        if probe.returncode == 0:
            return process, address
        time.sleep(1)
    process.terminate()
    raise RuntimeError("ray start --head did not come up within 60 s")


def stop_head(process: subprocess.Popen) -> None:
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def overhead(console: Console, epochs: int = 6, repeats: int = 2) -> dict:
    """Run every measurement and print the tables; returns the figures."""
    figures: dict = {}
    with tempfile.TemporaryDirectory() as workdir:
        storage = str(Path(workdir) / "runs")

        def job_file(name: str) -> Path:
            path = Path(workdir) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(bench_job(storage, name, epochs)))
            return path

        # The CPU runs faster when it has rested, so the plain loop is measured before and after the
        # others and start-up is measured `repeats` times, alternating bare and ours; minima are kept.
        console.print(f"plain PyTorch loop, {epochs} epochs ...")
        plain = plain_loop_epoch_seconds(bench_job(storage, "plain", epochs), epochs)
        console.print("orchestrator train --local ...")
        figures["local_first_step_s"], figures["local_epoch_s"] = run_train(job_file("local"), ["--local"])
        cold_bare, cold_ours, warm_bare, warm_ours = [], [], [], []
        for repeat in range(repeats):
            console.print(f"cold start-up, round {repeat + 1} of {repeats}: bare TorchTrainer, then orchestrator train ...")
            cold_bare.append(run_bare(None))
            first_step_s, epoch_s = run_train(job_file(f"ray_cold_{repeat}"), [])
            cold_ours.append(first_step_s)
            if repeat == 0:
                figures["ray_epoch_s"] = epoch_s
        console.print("starting a local cluster (ray start --head) ...")
        env = token_env()
        head, address = start_head(os.cpu_count() or 1, env)
        try:
            for repeat in range(repeats):
                console.print(f"warm start-up against {address}, round {repeat + 1} of {repeats} ...")
                warm_bare.append(run_bare(address, env))
                warm_ours.append(run_train(job_file(f"ray_warm_{repeat}"), ["--address", address], env)[0])
        finally:
            stop_head(head)
        console.print(f"plain PyTorch loop again, {epochs} epochs ...")
        plain_after = plain_loop_epoch_seconds(bench_job(storage, "plain", epochs), epochs)
    figures.update(plain_epoch_s=plain[1:] + plain_after[1:], bare_cold_s=min(cold_bare), ray_cold_first_step_s=min(cold_ours),
                   bare_warm_s=min(warm_bare), ray_warm_first_step_s=min(warm_ours))
    print_overhead(console, figures)
    return figures


def steady(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def print_overhead(console: Console, f: dict) -> None:
    plain = statistics.median(f["plain_epoch_s"])   # both sessions, first epochs already left out
    table = Table(title="steady state: seconds per training epoch (median, first epoch of each run left out; "
                        "plain loop measured before and after the others)", title_justify="left")
    for column in ("path", "s/epoch", "ratio to plain loop"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for label, key in (("plain PyTorch loop", "plain_epoch_s"), ("orchestrator train --local", "local_epoch_s"),
                       ("orchestrator train (Ray Train, 1 worker)", "ray_epoch_s")):
        value = plain if key == "plain_epoch_s" else steady(f[key])
        table.add_row(label, f"{value:.3f}", f"{value / plain:.3f}")
    console.print(table)
    start = Table(title="start-up: seconds from command start to the first training step (best of the rounds)", title_justify="left")
    for column in ("", "cold (new local Ray)", "warm (--address)"):
        start.add_column(column, justify="left" if not column else "right")
    start.add_row("bare TorchTrainer (Ray's floor)", f"{f['bare_cold_s']:.1f}", f"{f['bare_warm_s']:.1f}")
    start.add_row("orchestrator train", f"{f['ray_cold_first_step_s']:.1f}", f"{f['ray_warm_first_step_s']:.1f}")
    start.add_row("difference", f"{f['ray_cold_first_step_s'] - f['bare_cold_s']:+.1f}", f"{f['ray_warm_first_step_s'] - f['bare_warm_s']:+.1f}")
    start.add_row("orchestrator train --local", f"{f['local_first_step_s']:.1f}", "")
    console.print(start)
    console.print("goals: Ray steady-state ratio <= 1.05; start-up within 3 s of the bare TorchTrainer")


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


def timed_train(job_path: Path, env: dict) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(job_path)], capture_output=True, text=True, env=env)
    return done.returncode, time.perf_counter() - started


def reliability(console: Console, runs: int = 3) -> dict:
    """Kill one worker once in the middle of epoch 3 of 4, `runs` times; compare with a clean run."""
    import pyarrow.parquet as pq

    from orchestrator.prepare import resolve_plan
    from orchestrator.spec import validate_spec

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
            code, seconds = timed_train(job_file(f"faulty_{index}"), {**os.environ, "ORCHESTRATOR_FAULT_AT_STEP": str(fault_step)})
            run = Path(storage) / f"faulty_{index}"
            epochs = [r["epoch"] for r in pq.read_table(run / METRICS_FILE).to_pylist()] if (run / METRICS_FILE).exists() else []
            outcomes.append({
                "completed": code == 0 and json.loads((run / SUMMARY_FILE).read_text())["status"] == "completed",
                "killed": (run / "fault_injected.json").exists(),
                "lost": len(set(range(plan.epochs)) - set(epochs)), "repeated": len(epochs) - len(set(epochs)),
                "recovery_s": seconds - clean_s,
            })
    figures = {"runs": runs, "completed": sum(o["completed"] for o in outcomes), "killed": sum(o["killed"] for o in outcomes),
               "epochs_lost": sum(o["lost"] for o in outcomes), "epochs_repeated": sum(o["repeated"] for o in outcomes),
               "mean_recovery_s": statistics.mean(o["recovery_s"] for o in outcomes), "clean_s": clean_s}
    table = Table(title="worker kill and recovery", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in (("completed", f"{figures['completed']}/{runs} (a worker was killed in {figures['killed']})"),
                       ("epochs lost", str(figures["epochs_lost"])), ("epochs repeated", str(figures["epochs_repeated"])),
                       ("mean recovery cost", f"{figures['mean_recovery_s']:.1f} s (faulty run's wall time - clean run's, {clean_s:.1f} s)")):
        table.add_row(key, value)
    console.print(table)
    console.print(f"goal: {runs}/{runs} completed, 0 lost, 0 repeated")
    return figures


def sweep_bench_job(storage: str, name: str, epochs: int, grace_period: int) -> dict:
    """16 fixed configurations (4 LRs x 4 schedules) of a few-shot digits run, 1 worker each."""
    return {
        "name": name, "seed": 0,
        "data": {"source": "builtin:digits", "classes": [0, 1, 2, 3, 4], "max_per_class": 40, "image_size": 16},
        "model": {"arch": "resnet18"},
        "optim": {"name": "sgd", "base_lr": 0.1, "base_batch_size": 256},
        "schedule": {"name": "cosine", "epochs": epochs, "warmup_epochs": 1, "step_size": 3, "gamma": 0.5, "patience": 1},
        "scaling": {"num_workers": 1, "per_worker_batch_size": 32},
        "run": {"storage": storage, "max_failures": 0},
        "sweep": {"metric": "val_acc1", "mode": "max", "num_samples": 1,
                  "asha": {"grace_period": grace_period, "reduction_factor": 3},
                  "space": {"optim.base_lr": {"grid": [0.001, 0.01, 0.1, 1.0]},
                            "schedule.name": {"grid": ["cosine", "step", "exponential", "plateau"]}}},
    }


def sweep_bench(console: Console, epochs: int = 9) -> dict:
    """The same 16 configurations with ASHA (grace 1, reduction 3) and at full budget (no stopping)."""
    import pyarrow.parquet as pq

    figures = {}
    with tempfile.TemporaryDirectory() as workdir:
        storage = str(Path(workdir) / "runs")
        for label, grace in (("asha", 1), ("full", epochs)):
            path = Path(workdir) / f"{label}.yaml"
            path.write_text(yaml.safe_dump(sweep_bench_job(storage, label, epochs, grace)))
            console.print(f"sweep of 16 configurations, {'ASHA' if grace == 1 else 'full budget'} ...")
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(path)], capture_output=True, text=True,
                                  env={**os.environ, "COLUMNS": "200"})
            if done.returncode != 0:
                raise RuntimeError(f"the {label} sweep failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            rows = pq.read_table(Path(storage) / label / "results.parquet").to_pylist()
            figures[label] = {"epochs": sum(r["epochs_run"] for r in rows), "best": max(r["best_val_acc1"] for r in rows),
                              "trials": len(rows), "seconds": time.perf_counter() - started}
    table = Table(title="ASHA vs full budget, the same 16 configurations", title_justify="left")
    for column in ("", "epochs used", "best val_acc1", "wall s"):
        table.add_column(column, justify="left" if not column else "right")
    for label in ("full", "asha"):
        f = figures[label]
        table.add_row("full budget" if label == "full" else "ASHA", str(f["epochs"]), f"{f['best']:.4f}", f"{f['seconds']:.0f}")
    ratio = figures["asha"]["epochs"] / figures["full"]["epochs"]
    gap = 100 * (figures["full"]["best"] - figures["asha"]["best"])
    table.add_row("ASHA / full", f"{ratio:.2f}", f"{-gap:+.2f} points", f"{figures['asha']['seconds'] / figures['full']['seconds']:.2f}")
    console.print(table)
    console.print("goal: ASHA uses at most a third of the epochs, its best within 0.5 points of the full-budget best")
    figures.update(epoch_ratio=ratio, best_gap_points=gap)
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["bare"]:
        bare_trainer_main(sys.argv[2] if len(sys.argv) > 2 else None)
