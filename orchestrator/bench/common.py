"""What every benchmark shares: running `orchestrator train` in a fresh process and reading back its
run folder, and a local token-protected Ray head to measure against."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from orchestrator.storage import METRICS_FILE, RunFolder

FIRST_STEP_PATTERN = re.compile(r"first training step ([0-9.]+) s after the command started")


def run_train(job_path: Path, extra: list[str], env: dict | None = None) -> tuple[float, list[float]]:
    """(seconds to first step, train seconds per epoch) of `orchestrator train` in a fresh process."""
    command = [sys.executable, "-m", "orchestrator.cli", "train", str(job_path), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env={**(env or os.environ), "COLUMNS": "200"})
    match = FIRST_STEP_PATTERN.search(done.stdout)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    job = yaml.safe_load(job_path.read_text())
    rows = RunFolder(job["run"]["storage"], job["name"]).read_rows(METRICS_FILE)
    return float(match.group(1)), [r["train_s"] for r in rows]


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


def timed_train(job_path: Path, env: dict) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(job_path)], capture_output=True, text=True, env=env)
    return done.returncode, time.perf_counter() - started
