"""`orchestrator submit` and `orchestrator jobs`: training jobs on a remote Ray cluster via the Jobs API.

The job file is validated here first (a bad one sends nothing). What is sent: a runtime
environment whose working_dir holds the resolved job file and whose py_modules carries this
package, and the entrypoint `python -m orchestrator.cli train job.yaml`. The cluster needs torch,
torchvision and ray installed (cluster/ sets that up). Auth: a Ray token, when present
(`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`), is sent by Ray's client once
`RAY_AUTH_MODE=token` is set, which this module does; the token is never read or printed here.
A token is only sent over https or to loopback: plain http to another machine is refused unless
--insecure (`check_transport`); `train`/`sweep --address` follow the same rule (`check_cluster_address`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console

from orchestrator.config.errors import UserError
from orchestrator.config.jobfile import spec_to_yaml
from orchestrator.config.spec import JobSpec

JOB_FILE = "job.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60.0


class SubmitError(UserError):
    """A submission refused before anything was sent; the message says why and what to do."""


def is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(address: str, insecure: bool) -> None:
    """A Jobs API address (`http(s)://HOST:PORT`) that may be used: https, or loopback (an SSH tunnel).

    Plain http to another machine is refused: with a token, the token would cross the network in
    clear (anyone on the path could then run code on the cluster); without one, anyone can. `insecure`
    lets it through with a warning that says which of the two risks is taken.
    """
    from orchestrator.cluster.session import auth_token_available

    if address.startswith("https://") or is_loopback(address):
        return
    token = auth_token_available()
    risk = ("your Ray auth token would be sent in clear" if token
            else "with no Ray auth token, anyone who reaches it can run code on the cluster")
    if insecure:
        print(f"warning: --insecure: plain http to {address}: {risk}", file=sys.stderr)
        return
    raise SubmitError(f"--address {address}: plain http to another machine: {risk}; use https, or an SSH tunnel "
                      "(ssh -L 8265:127.0.0.1:8265 HEAD, then --address http://127.0.0.1:8265), "
                      "or --insecure if you accept the risk")


def check_cluster_address(address: str | None, insecure: bool) -> None:
    """A Ray cluster address for `train`/`sweep --address` (`HOST:PORT`, `ray://HOST:PORT`, `auto`).

    Ray's gRPC carries the token in clear unless Ray's TLS is on (RAY_USE_TLS=1): with a token, only
    loopback, `auto` (the cluster this machine belongs to) or TLS are allowed without `insecure`.
    """
    from orchestrator.cluster.session import auth_token_available

    if (address in (None, "auto", "local") or is_loopback(address) or not auth_token_available()
            or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")):
        return
    if insecure:
        print(f"warning: --insecure: your Ray auth token goes to {address} in clear (RAY_USE_TLS is off)", file=sys.stderr)
        return
    raise SubmitError(f"--address {address}: your Ray auth token would cross the network in clear (Ray's TLS is off); "
                      "run from a node of the cluster (--address auto), tunnel the port over SSH to 127.0.0.1, "
                      "set RAY_USE_TLS=1 with Ray's TLS certificates, or pass --insecure if you accept the risk")


def client(address: str):
    from orchestrator.cluster.session import prefer_token_auth

    prefer_token_auth()
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def package_dir() -> str:
    return str(Path(__file__).resolve().parent)


def submit(spec: JobSpec, address: str, insecure: bool = False) -> str:
    """Send the job; returns the job id."""
    check_transport(address, insecure)
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="orchestrator-job-") as staging:
        Path(staging, JOB_FILE).write_text(spec_to_yaml(spec))
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return jobs.submit_job(
                    entrypoint=f"python -m orchestrator.cli train {JOB_FILE}",
                    runtime_env={"working_dir": staging, "py_modules": [package_dir()]},
                    metadata={"orchestrator_job": spec.name},
                )
            except RuntimeError as exc:
                # a head that has just started answers this until its job agent is up
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(2)


def follow(address: str, job_id: str, console: Console) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    jobs = client(address)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    status = str(jobs.get_job_status(job_id).value)
    while status not in TERMINAL:   # the log stream can close a moment before the status settles
        time.sleep(0.5)
        status = str(jobs.get_job_status(job_id).value)
    console.print(f"job {job_id}: {status}")
    return status


def remote_storage_warning(spec: JobSpec) -> str | None:
    if "://" in spec.run.storage or Path(spec.run.storage).is_absolute():
        return None
    return (f"run.storage {spec.run.storage!r} is relative: on the cluster it resolves inside the job's working "
            "directory, which Ray deletes; use shared storage (s3://..., an NFS path)")
