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
