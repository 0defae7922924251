"""Issue 15: the LR range test and what stays light (the warm `up`/`down` cluster: test_cluster.py)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from orchestrator.cli import main
from orchestrator.train.lr_range import base_lr_for, ramp_lr, smooth, smoothing_beta, suggest_index


def lr_job(storage, name: str = "findlr") -> dict:
    """`bench sweep`'s job: 5 digit classes, 40 images each, 16 px, ResNet-18, batch 32, 1 worker, 9 epochs cosine."""
    from orchestrator.bench.sweep import sweep_bench_job

    job = sweep_bench_job(str(storage), name, 9, 9)
    job.pop("sweep")
    return job


GOOD_BASE_LR = (0.003, 0.1)
"""base_lr (at base_batch_size 256) that trains lr_job to within 1.5 points of the best validation accuracy,
as a grid sweep of it found (`orchestrator sweep`, optim.base_lr {grid: [0.0003, 0.001, 0.003, 0.01, 0.03,
0.1, 0.3, 1, 3]}, no early stopping; best val_acc1 of each): 0.713 at 0.0003, 0.902 at 0.001, 0.972 at
0.003, 0.986 at 0.01 (the best), 0.972 at 0.03 and at 0.1, then 0.874, 0.846, 0.594"""


def test_ramp_smoothing_and_scaling_are_what_they_say():
    assert ramp_lr(0, 100, 1e-6, 10) == pytest.approx(1e-6)
    assert ramp_lr(99, 100, 1e-6, 10) == pytest.approx(10)
    assert ramp_lr(33, 100, 1e-6, 10) / ramp_lr(32, 100, 1e-6, 10) == pytest.approx(1e7 ** (1 / 99))
    assert smoothing_beta(100) == pytest.approx(0.9) and smoothing_beta(20) == pytest.approx(0.8)
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])          # bias-corrected: no ramp-up from 0
    assert suggest_index([9, 9, 9, 9, 9, 9, 5, 4, 6, 7, 8, 9]) == 7
    assert suggest_index([0.1] + [9] * 5 + [5, 4, 6, 7, 8, 9]) == 7                  # the first steps do not count
    assert base_lr_for(0.05, 64, 256, "linear") == pytest.approx(0.2)
    assert base_lr_for(0.05, 64, 256, "sqrt") == pytest.approx(0.1)
    assert base_lr_for(0.05, 64, 256, "none") == pytest.approx(0.05)


def test_find_lr_suggests_a_base_lr_the_sweep_finds_good(tmp_path, write_job, capsys):
    job = write_job(lr_job(tmp_path / "runs"))
    out_png = tmp_path / "range.png"
    assert main(["find-lr", str(job), "--json", "--out", str(out_png)]) == 0          # the default 100 steps
    found = json.loads(capsys.readouterr().out)
    assert set(found) >= {"suggested_lr", "suggested_base_lr", "min_loss_lr", "global_batch_size", "points"}
    assert found["global_batch_size"] == 32
    assert GOOD_BASE_LR[0] <= found["suggested_base_lr"] <= GOOD_BASE_LR[1], found["suggested_base_lr"]
    assert found["suggested_base_lr"] == pytest.approx(found["suggested_lr"] * 256 / 32)
    points = found["points"]
    assert 20 <= len(points) <= 100 and points[0]["lr"] == pytest.approx(1e-6)
    assert all(a["lr"] < b["lr"] for a, b in zip(points, points[1:]))
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "runs").exists()                     # a probe, not a run: nothing in run storage


def test_find_lr_holds_the_global_batch_of_several_workers_by_accumulating(tmp_path, write_job, capsys):
    job = lr_job(tmp_path / "runs")
    job["scaling"].update(num_workers=4, per_worker_batch_size=8, grad_accum_steps=2)
    path = write_job(job)
    assert main(["find-lr", str(path), "--steps", "20", "--end-lr", "1", "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "global batch 64 (8 micro-batches of 8 per step)" in out
    assert "--set optim.base_lr=" in out and "base_lr" in out


@pytest.mark.parametrize("args, expected", [
    (["--steps", "5"], "--steps: 5; the range test needs at least 20 steps"),
    (["--start-lr", "1", "--end-lr", "0.1"], "need 0 < start < end"),
])
def test_find_lr_refuses_what_it_cannot_run(tmp_path, write_job, capsys, args, expected):
    path = write_job(lr_job(tmp_path / "runs"))
    assert main(["find-lr", str(path), *args, "--out", str(tmp_path / "r.png")]) == 2
    assert expected in capsys.readouterr().err


def test_find_lr_refuses_missing_data_and_a_model_with_nothing_to_train(tmp_path, write_job, capsys):
    missing = write_job(lr_job(tmp_path / "runs") | {"data": {"source": f"imagefolder:{tmp_path / 'nope'}"}}, "missing.yaml")
    assert main(["find-lr", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    frozen = lr_job(tmp_path / "runs")
    frozen["model"]["freeze"] = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert main(["find-lr", str(write_job(frozen, "frozen.yaml"))]) == 2
    assert "nothing would train" in capsys.readouterr().err


def test_the_train_controller_unpickles_nothing_heavy():
    """The failure policy goes to Ray Train's controller process: importing it must not import torch (~3 s there)."""
    code = "import sys; import orchestrator.cluster.failure_policy; print('torch' in sys.modules, 'orchestrator.train.fit' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["False", "False"], done.stderr[-2000:]
