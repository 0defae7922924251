"""Issue 6: cluster configs that load, and submission to a real Ray cluster started here (`up` via start.sh)."""

import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_in_terminal, tiny_job

CLUSTER = REPO / "cluster"


def test_autoscaler_config_matches_rays_schema():
    import jsonschema
    import ray

    schema = json.loads(open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")).read())
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1
    assert any("pip install -e" in command for command in config["setup_commands"])
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests_have_what_kuberay_needs(name, kind):
    manifest = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind and manifest["metadata"]["name"]
    cluster = manifest["spec"] if kind == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert "rayStartParams" in group
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and container["name"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"])
    if kind == "RayJob":
        assert manifest["spec"]["entrypoint"].startswith("orchestrator train jobs/")
        assert (REPO / manifest["spec"]["entrypoint"].split()[2]).is_file()


def test_plain_http_to_another_machine_without_a_token_is_refused(tmp_path, write_job):
    job = write_job(tiny_job(tmp_path, "remote"))
    env = {**os.environ, "HOME": str(tmp_path)}                  # no ~/.ray/auth_token there
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(job), "--address", "http://203.0.113.7:8265"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "plain http to another machine: with no Ray auth token, anyone" in done.stderr


class Recorder(http.server.BaseHTTPRequestHandler):
    """Records every request's headers; answers 404 (no Jobs API here)."""

    seen: list[str] = []

    def do_GET(self):
        Recorder.seen.append(f"{self.command} {self.path}\n{self.headers}")
        self.send_error(404)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def listener():
    """An HTTP server on every interface that records what reaches it: (port, recorded requests)."""
    Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], Recorder.seen
    server.shutdown()


def test_a_token_never_crosses_the_network_in_clear(tmp_path, write_job, listener):
    """With a token set, plain http to a non-loopback name (this machine's hostname, which reaches the
    listener) is refused by submit and jobs alike, and nothing arrives; the same to 127.0.0.1 does
    send the token, which shows the listener would have caught it."""
    port, seen = listener
    token = "orchestrator-test-token-" + "x" * 16
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_TOKEN": token}
    env.pop("RAY_AUTH_MODE", None)
    remote = f"http://{socket.gethostname()}:{port}"
    job = write_job(tiny_job(tmp_path, "remote"))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    for args in (["submit", str(job), "--address", remote], ["jobs", "list", "--address", remote],
                 ["jobs", "status", "raysubmit_1", "--address", remote], ["train", str(job), "--address", f"ray://{socket.gethostname()}:{port}"]):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert "auth token would" in done.stderr and token not in done.stderr + done.stdout
    assert seen == []
    cli("jobs", "list", "--address", f"http://127.0.0.1:{port}")        # the positive control
    assert seen and all(f"Bearer {token}" in request for request in seen)
    seen.clear()
    done = cli("jobs", "list", "--address", remote, "--insecure")       # asked for: it goes, and says so
    assert "warning: --insecure: plain http to" in done.stderr and "your Ray auth token would be sent in clear" in done.stderr
    assert seen


def test_a_bad_job_file_is_not_sent(tmp_path, write_job):
    job = write_job("optim:\n  base_lr: -1\n")
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(job), "--address", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "optim.base_lr: must be > 0" in done.stderr   # port 9 was never contacted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_processes(folder) -> list[str]:
    return subprocess.run(["pgrep", "-f", f"{folder}/session_"], capture_output=True, text=True).stdout.split()


@pytest.mark.ray
@pytest.mark.slow
def test_start_sh_then_train_and_submit_with_address_auto_then_stop_sh(tmp_path, write_job):
    """One cluster for the whole walk (starting one costs ~20 s here): cluster/local/start.sh (`orchestrator up`:
    a head with no CPUs and a worker node of 2), `up` again finds it, `train --address auto` joins it, `submit
    --follow` succeeds and a failing job reports FAILED, `jobs` shows them; stop.sh (`down`) leaves nothing."""
    folder = tempfile.mkdtemp(prefix="oc-", dir="/tmp")                # short: Ray's socket paths live under it
    env = {**os.environ, "WORKERS": "1", "CPUS_PER_WORKER": "2", "GCS_PORT": str(_free_port()),
           "DASHBOARD_PORT": str(_free_port()), "CLUSTER_DIR": folder, "ORCHESTRATOR_CLUSTER_DIR": folder}

    def cli(*args, timeout=600):
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, capture_output=True,
                              text=True, env=env, timeout=timeout)

    try:
        up = subprocess.run(["bash", str(CLUSTER / "local" / "start.sh")], env=env, capture_output=True, text=True, timeout=180)
        assert up.returncode == 0 and "up: head + 1 worker node(s), 2 CPUs" in up.stdout, up.stdout + up.stderr
        info = json.loads((Path(folder) / "cluster.json").read_text())
        assert info["address"] == f"127.0.0.1:{env['GCS_PORT']}" and info["dashboard"] == f"http://127.0.0.1:{env['DASHBOARD_PORT']}"
        assert "--address auto" in up.stdout
        again = cli("up")
        assert again.returncode == 0 and "already up" in again.stdout and json.loads((Path(folder) / "cluster.json").read_text()) == info
        _train_then_submit(cli, info, tmp_path, write_job)
        assert _cluster_processes(folder), "the cluster went down with the runs"
    finally:
        down = subprocess.run(["bash", str(CLUSTER / "local" / "stop.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "stopped the cluster" in down.stdout, down.stdout + down.stderr
    time.sleep(1)
    assert _cluster_processes(folder) == [] and not (Path(folder) / "cluster.json").exists()
    port = info["address"].rsplit(":", 1)[1]                          # Ray Client's server does not name the folder
    assert subprocess.run(["pgrep", "-f", f"ray.util.client.server --address=[0-9.]*:{port} "]).returncode == 1
    assert "no cluster running" in cli("down").stdout
    nothing = cli("submit", str(tmp_path / "warm.yaml"), "--address", "auto")
    assert nothing.returncode == 2 and "no cluster started by `orchestrator up` is running" in nothing.stderr


def _train_then_submit(cli, info: dict, tmp_path, write_job) -> None:
    job = write_job(tiny_job(tmp_path / "runs", "warm", schedule={"epochs": 1, "warmup_epochs": 0}), "warm.yaml")
    trained = cli("train", str(job), "--address", "auto")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert f"joining the Ray cluster at {info['address']}" in trained.stdout
    summary = json.loads((tmp_path / "runs" / "warm" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1

    job = write_job(tiny_job(tmp_path / "runs", "submitted", schedule={"epochs": 1, "warmup_epochs": 0}), "submitted.yaml")
    done = cli("submit", str(job), "--address", "auto", "--follow")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout and "test acc@1" in done.stdout
    summary = json.loads((tmp_path / "runs" / "submitted" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1
    job_id = done.stdout.split(" as job ", 1)[1].split()[0]
    for action, expected in (("status", "SUCCEEDED"), ("logs", "test acc@1")):
        shown = cli("jobs", action, job_id, "--address", info["dashboard"])
        assert shown.returncode == 0 and expected in shown.stdout, shown.stdout[-1000:] + shown.stderr[-1000:]

    bad = write_job(tiny_job(tmp_path / "runs", "doomed", data={"source": f"imagefolder:{tmp_path / 'no_such_folder'}"}), "bad.yaml")
    failed = cli("submit", str(bad), "--address", "auto", "--follow")
    assert failed.returncode == 1
    assert "FAILED" in failed.stdout and "does not exist" in failed.stdout + failed.stderr
    listed = cli("jobs", "list", "--address", "auto")
    assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout and "FAILED" in listed.stdout
    assert any(line.startswith(job_id) and "SUCCEEDED" in line for line in listed.stdout.splitlines())  # piped: whole rows
    narrow = run_in_terminal([sys.executable, "-m", "orchestrator.cli", "jobs", "list", "--address", info["dashboard"]],
                             columns=40)
    assert job_id in narrow and "…" not in narrow
    as_json = cli("jobs", "list", "--address", "auto", "--json")
    assert {job["job_id"]: job["status"] for job in json.loads(as_json.stdout)}[job_id] == "SUCCEEDED"
