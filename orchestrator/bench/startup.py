"""`orchestrator bench startup`: seconds from the command's start to the first training step.

Six measurements in one run, each in a fresh process, on the quickstart job cut to one epoch
(2 workers of 1 CPU, as the quickstart; the bare TorchTrainer gets the same workers):
- plain: a plain PyTorch script (`bench/plain_step.py`) that imports torch and torchvision, builds
  the same model and data and takes one step: the floor of any tool;
- local: `orchestrator train JOB --local`;
- bare_fresh / ours_fresh: a bare TorchTrainer whose loop does nothing, and `orchestrator train JOB`,
  each starting its own local Ray;
- bare_warm / ours_warm: the same against a cluster `orchestrator up` started (`--address auto`).
Each is measured `repeats` times, alternating, and the fastest kept (the machine is shared). The
warm cluster lives in its own folder and is stopped at the end.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from rich.console import Console

from orchestrator.bench.common import figures_table, run_train, warm_cluster
from orchestrator.bench.overhead import run_bare

PLAIN_PATTERN = re.compile(r"plain first step ([0-9.]+) s")
QUICKSTART = Path(__file__).resolve().parents[2] / "jobs" / "quickstart.yaml"
KEYS = ("plain_s", "local_s", "bare_fresh_s", "ours_fresh_s", "bare_warm_s", "ours_warm_s")
LOCAL_GOAL_S = 2.0
"""--local's first step within this many seconds of the plain script's"""
WARM_GOAL_RATIO = 1.10
"""ours against a warm cluster within 10% of the bare TorchTrainer there"""


def startup_job(storage: str, name: str) -> dict:
    job = yaml.safe_load(QUICKSTART.read_text())
    job["name"] = name
    job["schedule"].update(epochs=1, warmup_epochs=0)
    job["run"] = {"storage": storage, "max_failures": 0}
    return job


def run_plain() -> float:
    done = subprocess.run([sys.executable, "-m", "orchestrator.bench.plain_step"], capture_output=True, text=True)
    match = PLAIN_PATTERN.search(done.stdout)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"the plain script failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return float(match.group(1))


def startup(console: Console, repeats: int = 2) -> dict:
    """Measure every path `repeats` times (fastest kept); returns {KEY: seconds}."""
    seconds: dict[str, list[float]] = {key: [] for key in KEYS}
    with tempfile.TemporaryDirectory(prefix="orch-startup-") as workdir:
        storage = str(Path(workdir) / "runs")
        counter = itertools.count()

        def job_file() -> Path:
            name = f"startup_{next(counter)}"
            path = Path(workdir) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(startup_job(storage, name)))
            return path

        workers = startup_job(storage, "probe")["scaling"]["num_workers"]
        for round_ in range(repeats):
            console.print(f"round {round_ + 1} of {repeats}: plain script, --local, bare TorchTrainer and ours on a new local Ray ...")
            seconds["plain_s"].append(run_plain())
            seconds["local_s"].append(run_train(job_file(), ["--local"])[0])
            seconds["bare_fresh_s"].append(run_bare("local", workers=workers, cpus_per_worker=1))
            seconds["ours_fresh_s"].append(run_train(job_file(), [])[0])
        console.print("orchestrator up (a warm local cluster) ...")
        with warm_cluster(Path(workdir) / "cluster") as (address, env):
            for round_ in range(repeats):
                console.print(f"round {round_ + 1} of {repeats} against the warm cluster ({address}) ...")
                seconds["bare_warm_s"].append(run_bare(address, env, workers=workers, cpus_per_worker=1))
                seconds["ours_warm_s"].append(run_train(job_file(), ["--address", "auto"], env)[0])
    return {key: min(values) for key, values in seconds.items()}


def print_startup(console: Console, f: dict) -> None:
    table = figures_table("seconds from command start to the first training step (fastest of the rounds)",
                          ("", "new local Ray", "warm cluster (orchestrator up)"))
    table.add_row("bare TorchTrainer, loop does nothing (Ray's floor)", f"{f['bare_fresh_s']:.1f}", f"{f['bare_warm_s']:.1f}")
    table.add_row("orchestrator train", f"{f['ours_fresh_s']:.1f}", f"{f['ours_warm_s']:.1f}")
    table.add_row("ours / bare", f"{f['ours_fresh_s'] / f['bare_fresh_s']:.2f}", f"{f['ours_warm_s'] / f['bare_warm_s']:.2f}")
    console.print(table)
    local = figures_table("in one process", ("", "seconds"))
    local.add_row("plain PyTorch script (import, build, one step)", f"{f['plain_s']:.1f}")
    local.add_row("orchestrator train --local", f"{f['local_s']:.1f}")
    local.add_row("difference", f"{f['local_s'] - f['plain_s']:+.1f}")
    console.print(local)
    console.print(f"goals: --local within {LOCAL_GOAL_S:g} s of the plain script; ours on a warm cluster within "
                  f"{WARM_GOAL_RATIO - 1:.0%} of the bare TorchTrainer there")
