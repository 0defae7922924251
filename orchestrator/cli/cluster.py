"""The commands for clusters: submit a job, list/inspect/stop jobs, start and stop a local cluster."""

from __future__ import annotations

import argparse
import sys
import time

from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import add_cluster_options, add_job_options, console, err_console
from orchestrator.config.errors import UserError


class SubmitUsageError(UserError):
    """A jobs command used wrongly."""


def cmd_submit(args) -> int:
    from orchestrator.cluster import submit
    from orchestrator.cluster.local_cluster import resolve_dashboard
    from orchestrator.config.jobfile import load_spec
    from orchestrator.data.augment import check_transforms
    from orchestrator.train.models import check_arch

    spec = check_transforms(load_spec(args.job, args.set))  # a bad job file: exit 2, nothing sent
    check_arch(spec.model.arch)
    args.address = resolve_dashboard(args.address)
    warning = submit.remote_storage_warning(spec)
    if warning:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    job_id = submit.submit(spec, args.address, insecure=args.insecure)
    console.print(f"submitted {spec.name} as job {job_id} to {args.address}")
    console.print(f"follow it with: orchestrator jobs logs {job_id} --follow --address {args.address}")
    if not args.follow:
        return 0
    return 0 if submit.follow(args.address, job_id, console) == "SUCCEEDED" else 1

def cmd_jobs(args) -> int:
    from orchestrator.cluster import submit
    from orchestrator.cluster.local_cluster import resolve_dashboard

    args.address = resolve_dashboard(args.address)
    submit.check_transport(args.address, args.insecure)
    jobs = submit.client(args.address)
    if args.action == "list":
        return _list_jobs(jobs.list_jobs(), args)
    if not args.job_id:
        raise SubmitUsageError(f"orchestrator jobs {args.action} needs a job id")
    if args.action == "status":
        info = jobs.get_job_info(args.job_id)
        if args.json:
            from orchestrator.store.storage import strict_json

            print(strict_json(_job_json(info)))
            return 0
        console.print(f"{args.job_id}: {info.status.value}" + (f" ({escape(info.message)})" if info.message else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            return 0 if submit.follow(args.address, args.job_id, console) == "SUCCEEDED" else 1
        sys.stdout.write(jobs.get_job_logs(args.job_id))
        return 0
    stopped = jobs.stop_job(args.job_id)
    console.print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0

def cmd_up(args) -> int:
    from orchestrator.cluster.local_cluster import up

    console.print("starting a local Ray cluster (ray start --head, token auth, loopback only) ...")
    info, started = up(args.workers, args.cpus, args.port, args.dashboard_port, args.nodes)
    nodes = f"head + {info.workers} worker node(s)" if info.workers else "one node"
    console.print(f"{'up' if started else 'already up'}: {nodes}, {info.cpus} CPUs; GCS {info.address}, "
                  f"dashboard and Jobs API {info.dashboard}; Ray's files in {info.folder}")
    console.print("use it: orchestrator train JOB --address auto  (also sweep, submit, jobs); stop it: orchestrator down")
    return 0

def cmd_down(args) -> int:
    from orchestrator.cluster.local_cluster import down

    folder, stopped = down()
    console.print(f"stopped the cluster under {folder} ({stopped} processes)" if stopped else f"no cluster running under {folder}")
    return 0


DASHBOARD_HELP = "the cluster's dashboard, e.g. http://127.0.0.1:8265 (auto: `orchestrator up`'s)"


def add_submit(p: argparse.ArgumentParser) -> None:
    """validate the job here, then run it on a Ray cluster through the Jobs API"""
    add_job_options(p)
    add_cluster_options(p, DASHBOARD_HELP, required=True)
    p.add_argument("--follow", action="store_true", help="stream the logs; exit 0 only if the job succeeds")


def _job_json(job) -> dict:
    return {"job_id": job.submission_id or job.job_id, "status": str(job.status.value), "entrypoint": job.entrypoint,
            "start_time": job.start_time / 1000 if job.start_time else None,
            "end_time": job.end_time / 1000 if job.end_time else None, "message": job.message or None,
            "name": (job.metadata or {}).get("orchestrator_job")}


def _list_jobs(found: list, args) -> int:
    from orchestrator.store.storage import strict_json
    from orchestrator.train.progress import print_listing

    if args.json:
        print(strict_json([_job_json(job) for job in found]))
        return 0
    table = Table(title=f"jobs on {args.address}", title_justify="left")
    for column in ("job id", "status", "job", "entrypoint", "start"):
        table.add_column(column)
    for job in found:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        table.add_row(job.submission_id or job.job_id or "-", str(job.status.value),
                      escape((job.metadata or {}).get("orchestrator_job", "-")), escape(job.entrypoint), started)
    print_listing(console, table, ("job id",))
    return 0


def add_jobs(p: argparse.ArgumentParser) -> None:
    """list, inspect, follow or stop jobs on a Ray cluster"""
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="job id (status, logs, stop)")
    add_cluster_options(p, DASHBOARD_HELP, required=True)
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    p.add_argument("--json", action="store_true",
                   help='list, status: print [{"job_id", "status", "entrypoint", "start_time", "end_time", "message", "name"}] (one object for status)')


def add_up(p: argparse.ArgumentParser) -> None:
    """start a warm local Ray cluster (token auth, loopback) for --address auto"""
    p.add_argument("--workers", type=int, default=0,
                   help="worker nodes besides the head (default 0: one node does the work; N: a head with no CPUs + N nodes)")
    p.add_argument("--nodes", type=int, default=None,
                   help="K nodes: the head plus K-1 worker nodes, each a separate `ray start` with its share of the CPUs "
                        "(a multi-node cluster on this machine); `up` again starts any it has lost")
    p.add_argument("--cpus", type=int, default=None, help="CPUs for Ray to schedule, all nodes together (default: all)")
    p.add_argument("--port", type=int, default=6380, help="GCS port on 127.0.0.1 (default 6380; a free one if taken)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and Jobs API port (default 8265; a free one if taken)")


def add_down(p: argparse.ArgumentParser) -> None:
    """stop the cluster `orchestrator up` started (nothing else)"""
