"""Shared fixtures. Torch runs on few threads: the suite shares 2 cores with Ray workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def write_job(tmp_path):
    """write_job(text_or_dict) -> path of a job file in a temp folder."""
    import yaml

    def write(content, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return path

    return write


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (starting one costs ~10 s here); the CLI reuses it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)   # with the dashboard, as users run it
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_bucket(monkeypatch):
    """A real S3 API on 127.0.0.1 (moto's server) with one bucket; pyarrow finds it through AWS_ENDPOINT_URL."""
    import socket

    from moto import server as moto_server
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="weights")
    yield client
    server.stop()


def tiny_job(storage, name: str, **sections) -> dict:
    """A job that trains in seconds: 3 digit classes, 16 px, resnet18, 2 epochs."""
    job = {
        "name": name,
        "seed": 0,
        "data": {"source": "builtin:digits", "classes": [0, 1, 2], "max_per_class": 24, "image_size": 16},
        "model": {"arch": "resnet18"},
        "optim": {"name": "sgd", "base_lr": 0.1, "base_batch_size": 32},
        "schedule": {"name": "cosine", "epochs": 2, "warmup_epochs": 0.5},
        "scaling": {"num_workers": 2, "per_worker_batch_size": 8},
        "run": {"storage": str(storage), "keep_checkpoints": 2, "max_failures": 0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            job.setdefault(section, {}).update(values)
        else:
            job[section] = values
    return job


def run_in_terminal(args: list[str], columns: int, env: dict | None = None, timeout: float = 120) -> str:
    """Run a command with a pseudo-terminal `columns` wide as stdout and stderr; its output, ANSI escapes removed."""
    import fcntl
    import pty
    import re
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**(env or os.environ), "COLUMNS": str(columns), "TERM": "xterm"}
    with subprocess.Popen(args, stdout=slave, stderr=slave, env=env) as proc:
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:      # EIO: the command closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=timeout)
    os.close(master)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", b"".join(chunks).decode(errors="replace"))
