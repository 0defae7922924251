"""The table of commands: name, what it does (its --help), the function that adds its options, the
function that runs it. Adding a command is its module plus one row here (tests/test_cli.py keeps the
table, the parser and the README's tour in step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.cli import after, bench, cluster, data, job


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_options: Callable
    run: Callable


COMMANDS = (
    Command("validate", "check a job file; exit 2 with one line per problem", job.add_validate, job.cmd_validate),
    Command("plan", "print the resolved plan: global batch, scaled LR, steps, parameter groups", job.add_plan, job.cmd_plan),
    Command("train", "train the job: Ray Train DDP workers, or --local in this process", job.add_train, job.cmd_train),
    Command("sweep", "ASHA sweep over the job's sweep.space with Ray Tune; leaderboard, results.parquet, best.yaml",
            job.add_sweep, job.cmd_sweep),
    Command("submit", "validate the job here, then run it on a Ray cluster through the Jobs API",
            cluster.add_submit, cluster.cmd_submit),
    Command("jobs", "list, inspect, follow or stop jobs on a Ray cluster", cluster.add_jobs, cluster.cmd_jobs),
    Command("runs", "one row per run and sweep folder in a storage: status, epochs, accuracy, time",
            after.add_runs, after.cmd_runs),
    Command("report", "PNG plots and one self-contained HTML page of a run or a sweep", after.add_report, after.cmd_report),
    Command("export", "the run's best weights as ONNX, a torch.export program or safetensors",
            after.add_export, after.cmd_export),
    Command("evaluate", "acc@1/@5, per-class accuracy and a confusion matrix of a run's model on a split",
            after.add_evaluate, after.cmd_evaluate),
    Command("predict", "classify image files with a run's model (or an exported .safetensors/.onnx)",
            after.add_predict, after.cmd_predict),
    Command("up", "start a warm local Ray cluster (token auth, loopback) for --address auto", cluster.add_up, cluster.cmd_up),
    Command("down", "stop the cluster `orchestrator up` started (nothing else)", cluster.add_down, cluster.cmd_down),
    Command("find-lr", "LR range test on one process at the job's global batch; suggests optim.base_lr",
            job.add_find_lr, job.cmd_find_lr),
    Command("pack", "pack an ImageFolder tree into Parquet shards + manifest.json (data.source: shards:OUT)",
            data.add_pack, data.cmd_pack),
    Command("bench", "benchmarks that print their figures as ratios to a baseline measured in the same run",
            bench.add_bench, bench.cmd_bench),
)
