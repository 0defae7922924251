"""`orchestrator up` / `down`: a warm local Ray cluster that `train|sweep|submit --address auto` use.

`up` starts a Ray head on this machine with `ray start` (token auth on: a token is generated into
~/.ray/auth_token when none is configured, never printed; GCS, dashboard and Jobs API on 127.0.0.1
only), optionally plus worker nodes, all under one folder (`cluster_dir()`), and records where it
listens in `<folder>/cluster.json`. Later commands then skip Ray's own start-up (`ray.init` of a new
instance, ~8 s here) and pay only for joining it. `down` stops exactly the processes of that folder's
sessions (SIGTERM, then SIGKILL after `STOP_WAIT_S`), leaving other Ray instances on the machine alone,
and removes the record. `resolve_address("auto")` is this cluster's GCS address while it answers,
else Ray's own `auto` (a cluster started by `ray start` elsewhere). Imports no Ray.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestrator.config.errors import UserError

STATE_FILE = "cluster.json"
DEFAULT_GCS_PORT = 6380
DEFAULT_DASHBOARD_PORT = 8265
START_TIMEOUT_S = 120
STOP_WAIT_S = 10.0
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]
"""Ray's command line from this interpreter (the `ray` script need not be on PATH)"""


class ClusterError(UserError):
    """`up` could not start the cluster, or `down` found something it will not touch (exit 2, one line)."""


@dataclass
class ClusterInfo:
    address: str
    """GCS address, 127.0.0.1:PORT: what `--address auto` resolves to"""
    dashboard: str
    """http://127.0.0.1:PORT: the dashboard and Jobs API (`submit --address`)"""
    folder: str
    """Ray's --temp-dir for every node of this cluster"""
    cpus: int
    """CPUs Ray schedules on, all nodes together"""
    workers: int
    """worker nodes besides the head (0: the head runs the work)"""
    started_at: float
    nodes: list[dict] = field(default_factory=list)
    """the worker nodes: {name, cpus, pgid}; each a `ray start --block` in its own process group (its raylet,
    agents and workers with it), so one can be lost (`kill_node`) and started again (`up`)"""


def cluster_dir() -> Path:
    """Where the warm cluster lives: $ORCHESTRATOR_CLUSTER_DIR, else /tmp/orchestrator-cluster-<uid> (short:
    Ray's socket paths under it must stay within the OS's limit)."""
    return Path(os.environ.get("ORCHESTRATOR_CLUSTER_DIR") or f"/tmp/orchestrator-cluster-{os.getuid()}")


def read_info(folder: Path | None = None) -> ClusterInfo | None:
    path = (folder or cluster_dir()) / STATE_FILE
    try:
        return ClusterInfo(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def answers(address: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at HOST:PORT."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def running_cluster(folder: Path | None = None) -> ClusterInfo | None:
    """The recorded cluster when its GCS answers, else None."""
    info = read_info(folder)
    return info if info is not None and answers(info.address) else None


def resolve_address(address: str | None) -> str | None:
    """`auto` -> the warm cluster's GCS address while it answers, else `auto` as Ray reads it; others unchanged."""
    if address != "auto":
        return address
    info = running_cluster()
    return info.address if info else address


def resolve_dashboard(address: str) -> str:
    """`auto` -> the warm cluster's dashboard URL (for submit/jobs), or ClusterError when none runs."""
    if address != "auto":
        return address
    info = running_cluster()
    if info is None:
        raise ClusterError("--address auto: no cluster started by `orchestrator up` is running here; "
                           "start one with `orchestrator up`, or give the dashboard URL (http://HOST:8265)")
    return info.dashboard


def _free_port(preferred: int) -> int:
    """`preferred` when nothing listens there, else a free port the OS picks."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise ClusterError("no free TCP port on 127.0.0.1")


def ray_env() -> dict[str, str]:
    """The environment for `ray start` and its nodes: token auth on, a token generated when none is
    configured, and this interpreter's folder first on PATH, so a job's `python` (a submitted entrypoint)
    is the Python that started the cluster, venv activated or not."""
    from orchestrator.cluster.session import auth_token_available

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
    if not auth_token_available():
        done = subprocess.run([*RAY_CLI, "get-auth-token", "--generate"], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise ClusterError("could not generate a Ray auth token: " + " | ".join(done.stderr.strip().splitlines()[-2:]))
    return env


def _ray_start(args: list[str], env: dict, log: Path) -> None:
    """`ray start ARGS`, its output in `log`; ClusterError when it fails or hangs."""
    try:
        with open(log, "wb") as out:
            done = subprocess.run([*RAY_CLI, "start", *args, "--disable-usage-stats"], stdout=out,
                                  stderr=subprocess.STDOUT, env=env, timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"ray start {' '.join(args[:2])} did not finish within {START_TIMEOUT_S} s; see {log}") from None
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise ClusterError(f"ray start {' '.join(args[:2])} failed (exit {done.returncode}); see {log}: {' | '.join(tail)}")


def _shares(cpus: int, parts: int) -> list[int]:
    return [cpus // parts + (1 if i < cpus % parts else 0) for i in range(parts)]


def up(workers: int = 0, cpus: int | None = None, gcs_port: int = DEFAULT_GCS_PORT,
       dashboard_port: int = DEFAULT_DASHBOARD_PORT, nodes: int | None = None) -> tuple[ClusterInfo, bool]:
    """Start the warm cluster (or find it running, and start again the worker nodes it lost): (its info,
    whether this call started it).

    workers 0: one head node with `cpus` CPUs (default: all of this machine's). workers N: a head with
    no CPUs (it runs drivers, the dashboard and Tune's controller) plus N worker nodes sharing `cpus`.
    nodes K: the head plus K-1 worker nodes, the K sharing `cpus` (a multi-node cluster on one machine).
    """
    folder = cluster_dir()
    found = running_cluster(folder)
    if found is not None:
        return _restart_lost_nodes(found), False
    if nodes is not None:
        if nodes < 1 or workers:
            raise ClusterError(f"--nodes: {nodes}; give 1 or more nodes (the head counts), and not --workers besides")
        workers = nodes - 1
    if workers < 0:
        raise ClusterError(f"--workers: {workers}; give 0 (the head does the work) or more worker nodes")
    cpus = cpus or os.cpu_count() or 1
    if workers + (nodes is not None) > cpus:
        raise ClusterError(f"{workers + (nodes is not None)} nodes with --cpus {cpus}: every node that works needs at least one CPU")
    shares = _shares(cpus, nodes) if nodes is not None else [0, *_shares(cpus, workers)] if workers else [cpus]
    stale = read_info(folder)   # a record whose cluster died: clear what is left of it before starting again
    _stop_processes(folder, int(stale.address.rsplit(":", 1)[1]) if stale else None)
    folder.mkdir(parents=True, exist_ok=True)
    env = ray_env()
    gcs, dashboard = _free_port(gcs_port), _free_port(dashboard_port)
    # Ray's fixed default ports (the agent's 52365, Ray Client's 10001) would collide with any other Ray on
    # this machine, and between the nodes of this one: every node gets free ones.
    try:
        _ray_start(["--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={shares[0]}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={folder}",
                    f"--dashboard-agent-listen-port={_free_port(0)}", f"--ray-client-server-port={_free_port(0)}"],
                   env, folder / "head.log")
        started = [start_node(f"127.0.0.1:{gcs}", f"worker-{i}", share, env, folder)
                   for i, share in enumerate(shares[1:], start=1)]
    except ClusterError:
        _stop_processes(folder, gcs)   # no half-started cluster left behind
        raise
    info = ClusterInfo(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", str(folder), cpus, workers, time.time(), started)
    (folder / STATE_FILE).write_text(json.dumps(asdict(info), indent=2))
    return info, True


NODE_STARTED = b"Ray runtime started"
"""what `ray start` prints once its node has joined the cluster"""


def start_node(address: str, name: str, cpus: int, env: dict, folder: Path) -> dict:
    """A worker node: `ray start --block` in a process group of its own (its raylet, agents and workers
    in it), its output in `<folder>/<name>.log`; returns its record once it has joined (ClusterError when
    it does not within START_TIMEOUT_S)."""
    log = folder / f"{name}.log"
    with open(log, "ab") as out:
        start = out.tell()
        process = subprocess.Popen([*RAY_CLI, "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                                    f"--num-cpus={cpus}", f"--dashboard-agent-listen-port={_free_port(0)}", "--block",
                                    "--disable-usage-stats"], stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + START_TIMEOUT_S
    while NODE_STARTED not in log.read_bytes()[start:]:
        if process.poll() is not None or time.time() > deadline:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise ClusterError(f"ray start of node {name} {'failed' if process.poll() is not None else 'hangs'}; "
                               f"see {log}: {' | '.join(tail)}")
        time.sleep(0.2)
    return {"name": name, "cpus": cpus, "pgid": process.pid}


def node_alive(node: dict) -> bool:
    """Whether the node's `ray start --block` still runs (it ends with its raylet)."""
    return bool(_alive([node["pgid"]]))


def kill_node(name: str) -> None:
    """Lose a worker node as a dead machine would: SIGKILL to its whole process group (raylet, agents,
    workers), no clean-up. ClusterError when the running cluster has no such node."""
    info = running_cluster()
    node = next((n for n in (info.nodes if info else []) if n["name"] == name), None)
    if node is None:
        raise ClusterError(f"no worker node {name} in the running cluster")
    try:
        os.killpg(node["pgid"], signal.SIGKILL)
    except ProcessLookupError:
        pass


def _restart_lost_nodes(info: ClusterInfo) -> ClusterInfo:
    """The running cluster with every recorded worker node that is gone started again (same name and CPUs)."""
    lost = [node for node in info.nodes if not node_alive(node)]
    if not lost:
        return info
    env, folder = ray_env(), Path(info.folder)
    for node in lost:
        node.update(start_node(info.address, node["name"], node["cpus"], env, folder))
    (folder / STATE_FILE).write_text(json.dumps(asdict(info), indent=2))
    return info


def _processes() -> dict[int, tuple[int, bytes]]:
    """{pid: (parent pid, command line)} of every process this user can read."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            found[int(entry.name)] = (parent, (entry / "cmdline").read_bytes())
        except (OSError, ValueError, IndexError):
            continue
    return found


def _cluster_pids(folder: Path, gcs_port: int | None = None) -> list[int]:
    """This folder's cluster: processes whose command line names one of its Ray sessions (GCS, raylets,
    dashboard, log monitor), everything they started (agents and workers, whose titles Ray rewrites), and
    the Ray Client server of its GCS port."""
    table = _processes()
    pattern = f"{folder}/session_".encode()
    client = f":{gcs_port} ".encode() if gcs_port else None
    roots = {pid for pid, (_, cmd) in table.items()
             if pattern in cmd or (client and b"ray.util.client.server" in cmd and client in cmd.replace(b"\0", b" "))}
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found and pid != os.getpid():
            found.add(pid)
            todo += children.get(pid, [])
    return sorted(found)


def _stop_processes(folder: Path, gcs_port: int | None = None) -> int:
    """SIGTERM every process of the folder's cluster, SIGKILL what is left after STOP_WAIT_S; returns how many."""
    pids = _cluster_pids(folder, gcs_port)
    count = len(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + STOP_WAIT_S
        while time.time() < deadline and _alive(pids):
            time.sleep(0.2)
        pids = _alive(pids)
        if not pids:
            break
    return count


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie counts as gone)."""
    alive = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except (OSError, IndexError):
            continue
    return alive


def down() -> tuple[Path, int]:
    """Stop the warm cluster: (its folder, processes stopped); the record is removed."""
    folder = cluster_dir()
    info = read_info(folder)
    for node in info.nodes if info else []:   # a worker node's `ray start --block` and whatever of its group is left
        try:
            os.killpg(node["pgid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    stopped = _stop_processes(folder, int(info.address.rsplit(":", 1)[1]) if info else None)
    (folder / STATE_FILE).unlink(missing_ok=True)
    return folder, stopped
