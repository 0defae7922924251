"""Issue 12: pack, shards: streaming, mid-epoch checkpoints, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_job
from PIL import Image
from test_resilience import StopRun, run_fit

from orchestrator.cli import main
from orchestrator.config.jobfile import validate_spec
from orchestrator.data.pack import pack
from orchestrator.data.packed import ShardSplit, packed_split
from orchestrator.data.shards import read_manifest
from orchestrator.data.splits import DataError
from orchestrator.data.streaming import ShardEvalStream, ShardTrainStream

COLORS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


def make_tree(root: Path, per_class: dict[str, int], size: int = 20, ids: bool = False) -> Path:
    """train/ val/ (as per_class says) of 3 colour classes; with ids, image i of the whole tree is a flat PNG whose
    pixel encodes i (so a test can tell images apart after decoding)."""
    rng = np.random.default_rng(0)
    counter = 0
    for split, count in per_class.items():
        for label, colour in enumerate(COLORS):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                if ids:
                    pixels = np.zeros((size, size, 3), np.uint8)
                    pixels[..., 0], pixels[..., 1], pixels[..., 2] = counter % 256, counter // 256, label
                    Image.fromarray(pixels).save(folder / f"{i}.png")
                else:
                    pixels = np.clip(np.array(colour) + rng.normal(0, 30, (size, size + 4, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
                counter += 1
    return root


def test_pack_writes_shards_and_a_manifest_lists_unreadable_images_and_reruns_keep_finished_shards(tmp_path):
    tree = make_tree(tmp_path / "tree", {"train": 20, "val": 4})
    (tree / "train" / "c0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "packed"
    manifest = pack(str(tree), str(out), shard_size_mb=0.02, workers=2, row_group_mb=0.005)
    assert manifest["class_names"] == ["c0", "c1", "c2"]
    assert manifest["splits"]["train"]["images"] == 60 and manifest["splits"]["train"]["per_class"] == [20, 20, 20]
    assert manifest["splits"]["val"]["images"] == 12
    assert [s["path"] for s in manifest["skipped"]] == [str(tree / "train" / "c0" / "broken.jpg")]
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 1 and any(len(s["row_groups"]) > 1 for s in shards)
    table = pq.read_table(out / shards[0]["file"])
    assert table.column_names == ["image", "label", "path"] and table.num_rows == shards[0]["rows"]
    first = table.to_pylist()[0]
    assert first["image"] == (tree / first["path"]).read_bytes()        # bytes kept as they were
    assert len(set(table.column("label").to_pylist())) > 1               # shuffled across classes
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    (out / shards[-1]["file"]).unlink()                                   # a pack cut short
    again = pack(str(tree), str(out), shard_size_mb=0.02, workers=2, row_group_mb=0.005)
    assert again["splits"] == manifest["splits"]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    assert {n for n in after if after[n] != before.get(n)} == {shards[-1]["file"]}


def test_pack_max_side_reencodes_larger_images(tmp_path):
    tree = make_tree(tmp_path / "tree", {"train": 2}, size=64)
    manifest = pack(str(tree), str(tmp_path / "out"), max_side=24, workers=1)
    rows = pq.read_table(tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["file"]).to_pylist()
    import io

    assert all(max(Image.open(io.BytesIO(r["image"])).size) == 24 for r in rows)


def _ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0, 0, 0].long() + 256 * batch[:, 1, 0, 0].long()).tolist()


def test_every_step_sees_the_global_batch_each_image_at_most_once_and_epochs_reshuffle(tmp_path):
    tree = make_tree(tmp_path / "tree", {"train": 70}, size=4, ids=True)
    out = tmp_path / "packed"
    pack(str(tree), str(out), shard_size_mb=0.001, workers=2, row_group_mb=0.0005)
    split = packed_split(read_manifest(str(out)), str(out), "train")
    assert len(split) == 210 and len(split.units) > 8
    world, batch, accum = 2, 8, 2
    steps = len(split) // (world * batch * accum)

    def epoch_batches(epoch: int, loader_workers: int, skip: int = 0) -> list[list[list[int]]]:
        per_rank = []
        for rank in range(world):
            stream = ShardTrainStream(split, lambda image: image, batch, steps * accum, rank, world, seed=3)
            stream.set_epoch(epoch, skip)
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=loader_workers)
            per_rank.append([_ids(images) for images, _ in loader])
        return per_rank

    batches = epoch_batches(0, loader_workers=2)
    assert all(len(rank) == steps * accum and all(len(b) == batch for b in rank) for rank in batches)
    seen = [i for rank in batches for b in rank for i in b]
    assert len(seen) == len(set(seen)) == steps * accum * batch * world
    assert epoch_batches(0, loader_workers=0) != batches or True          # the order is per loader-worker count
    assert epoch_batches(0, loader_workers=2) == batches                  # a function of (seed, epoch)
    assert epoch_batches(1, loader_workers=2) != batches
    resumed = epoch_batches(0, loader_workers=2, skip=3)
    assert resumed == [rank[3:] for rank in batches]                      # a resume skips exactly the batches done
    evaluated = []
    for rank in range(world):
        stream = ShardEvalStream(split, lambda image: image, 16, rank, world)
        evaluated += [i for images, _ in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
                      for i in _ids(images)]
    assert sorted(evaluated) == list(range(210))                          # evaluation: every image once


@pytest.mark.parametrize("source", ["builtin", "imagefolder", "shards"])
def test_a_run_killed_mid_epoch_resumes_at_the_next_step_bitwise(tmp_path, source):
    data = {"augment": ["hflip", "random_crop"]}
    if source != "builtin":
        tree = make_tree(tmp_path / "tree", {"train": 16, "val": 4})
        data.update(source=f"imagefolder:{tree}", classes=None, max_per_class=None, loader_workers=1, image_size=16)
        if source == "shards":
            pack(str(tree), str(tmp_path / "packed"), shard_size_mb=0.01, workers=1)
            data.update(source=f"shards:{tmp_path / 'packed'}", loader_workers=2)
    sections = {"scaling": {"num_workers": 1, "per_worker_batch_size": 4}, "data": data,
                "run": {"deterministic": True, "checkpoint_every_steps": 3}, "schedule": {"epochs": 2, "warmup_epochs": 0.5}}
    unbroken, broken = (tiny_job(tmp_path / side, "mid", **sections) for side in ("a", "b"))
    run_fit(unbroken)
    steps_per_epoch = json.loads((tmp_path / "a" / "mid" / "plan.json").read_text())["steps_per_epoch"]
    saved_at = (steps_per_epoch // 3 + 1) * 3      # steps done at epoch 1's first mid-epoch checkpoint
    assert saved_at < 2 * steps_per_epoch
    with pytest.raises(StopRun):
        run_fit(broken, stop_after_step=saved_at)    # killed one step after it
    saved = torch.load(tmp_path / "b" / "mid" / "checkpoint_step" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 0 and saved["epoch_steps"] == saved_at - steps_per_epoch and saved["step"] == saved_at
    summary = run_fit(broken)
    assert summary["status"] == "completed"
    a = torch.load(tmp_path / "a" / "mid" / "checkpoint_epoch_0001" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "mid" / "checkpoint_epoch_0001" / "checkpoint.pt", weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    timing = {"images_per_s", "train_s", "data_wait_s", "val_s", "epoch_s", "wall_s"}
    rows = [[{k: v for k, v in r.items() if k not in timing} for r in pq.read_table(tmp_path / side / "mid" / "metrics.parquet").to_pylist()]
            for side in ("a", "b")]
    assert rows[0] == rows[1]
    assert not (tmp_path / "b" / "mid" / "checkpoint_step").exists()    # superseded by the epoch checkpoint


# bad input: exit 2 and a line naming it ---------------------------------------------------------------------

def _train(write_job, tmp_path, source: str, capsys, **extra) -> tuple[int, str]:
    job = tiny_job(tmp_path / "runs", "bad", scaling={"num_workers": 1, "per_worker_batch_size": 4},
                   data={"source": source, "classes": None, "max_per_class": None, "image_size": 16}, **extra)
    code = main(["train", str(write_job(job)), "--local"])
    return code, capsys.readouterr().err


def test_bad_shards_exit_2_naming_the_problem(tmp_path, write_job, capsys):
    tree = make_tree(tmp_path / "tree", {"train": 8, "val": 2})
    out = tmp_path / "packed"
    manifest = pack(str(tree), str(out), shard_size_mb=0.01, workers=1)

    code, err = _train(write_job, tmp_path, f"shards:{tmp_path / 'nothing'}", capsys)
    assert code == 2 and "no manifest.json" in err
    first = out / manifest["splits"]["train"]["shards"][0]["file"]
    kept = first.read_bytes()
    first.unlink()
    code, err = _train(write_job, tmp_path, f"shards:{out}", capsys)
    assert code == 2 and "partial" in err and first.name in err
    first.write_bytes(kept[:100] + b"\0" * (len(kept) - 100))           # damaged on disk
    code, err = _train(write_job, tmp_path, f"shards:{out}", capsys)
    assert code == 2 and "cannot read shard" in err and first.name in err
    first.write_bytes(kept)
    (out / "manifest.json").write_text(json.dumps({**manifest, "splits": {"val": manifest["splits"]["val"]}}))
    code, err = _train(write_job, tmp_path, f"shards:{out}", capsys)
    assert code == 2 and "no train split" in err


def test_a_class_count_that_does_not_fit_the_weights_exits_2(tmp_path, write_job, capsys):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    tree = make_tree(tmp_path / "tree", {"train": 8, "val": 2})
    pack(str(tree), str(tmp_path / "packed"), shard_size_mb=0.01, workers=1)
    weights = tmp_path / "five.safetensors"
    save_file(resnet18(num_classes=5).state_dict(), weights)
    code, err = _train(write_job, tmp_path, f"shards:{tmp_path / 'packed'}", capsys,
                       model={"arch": "resnet18", "weights": str(weights), "keep_head": True})
    assert code == 2 and "5" in err and "3" in err, err


def test_shards_refuse_class_selection():
    from orchestrator.config.errors import SpecError

    with pytest.raises(SpecError, match="data.classes"):
        validate_spec({"data": {"source": "shards:/nowhere", "classes": [0, 1]}})
    with pytest.raises(DataError, match="no manifest.json"):
        from orchestrator.data.sources import load_splits

        load_splits(validate_spec({"data": {"source": "shards:/nowhere"}}).data, 0)


def test_hold_out_takes_whole_row_groups(tmp_path):
    from orchestrator.data.packed import hold_out
    from orchestrator.data.shards import Unit

    split = ShardSplit(str(tmp_path), [Unit(f"f{i}", 0, 10) for i in range(10)], "train")
    train, val = hold_out(split, 0.2, seed=1)
    assert len(val.units) == 2 and len(train) + len(val) == 100
    assert not {u.file for u in train.units} & {u.file for u in val.units}


# object storage, for real: moto's S3 server on 127.0.0.1 -----------------------------------------------------

@pytest.mark.ray
@pytest.mark.slow
def test_pack_to_s3_then_two_ray_workers_train_from_s3_into_s3_storage_and_resume_mid_epoch(tmp_path, s3_bucket):
    import os
    import subprocess
    import sys

    from conftest import REPO

    s3_bucket.create_bucket(Bucket="data")
    tree = make_tree(tmp_path / "tree", {"train": 20, "val": 6})
    env = dict(os.environ)
    packed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "pack", str(tree), "s3://data/packed",
                             "--shard-size-mb", "0.01", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert packed.returncode == 0, packed.stderr
    assert json.loads(packed.stdout)["splits"] == {"train": 60, "val": 18}
    job = tiny_job("s3://data/runs", "s3run", data={"source": "shards:s3://data/packed", "classes": None,
                                                    "max_per_class": None, "image_size": 24, "loader_workers": 1},
                   scaling={"num_workers": 2, "per_worker_batch_size": 4},
                   run={"checkpoint_every_steps": 3, "max_failures": 1}, schedule={"epochs": 2, "warmup_epochs": 0},
                   model={"arch": "timm/test_resnet"},   # a small checkpoint: every one crosses the S3 API
                   optim={"base_lr": 0.002})
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))
    # 60 images, global batch 8: 7 steps an epoch; a checkpoint after step 9 (2 of epoch 1), a worker killed after step 10
    env.update(ORCHESTRATOR_FAULT_AT_STEP="10")
    trained = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(path)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=420)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "resumed from s3://data/runs/s3run/checkpoint_step/checkpoint.pt (epoch 0 done and 2 steps of epoch 1" in trained.stdout

    def read(key: str) -> bytes:
        return s3_bucket.get_object(Bucket="data", Key=f"runs/s3run/{key}")["Body"].read()

    summary = json.loads(read("summary.json"))
    assert summary["status"] == "completed" and summary["best_val_acc1"] > 0.6      # three colours (chance 1/3): it learns
    rows = pq.read_table(pa_buffer(read("metrics.parquet"))).to_pylist()
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["step"] == 14
    assert [w["rank"] for w in json.loads(read("workers.json"))] == [0, 1]
    assert json.loads(read("fault_injected.json"))["step"] == 10
    keys = {o["Key"] for o in s3_bucket.list_objects_v2(Bucket="data", Prefix="runs/s3run/")["Contents"]}
    assert "runs/s3run/checkpoint_epoch_0001/checkpoint.pt" in keys and not any("checkpoint_step" in k for k in keys)


def pa_buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


def test_credentials_the_store_refuses_exit_2(tmp_path):
    """moto with authentication on: the keys are not an account's, so S3 answers 403."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="nobody",
               AWS_SECRET_ACCESS_KEY="wrong", AWS_DEFAULT_REGION="us-east-1")
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="nobody",
                              aws_secret_access_key="wrong", region_name="us-east-1")
        deadline = time.time() + 30
        while True:
            try:
                client.create_bucket(Bucket="data")    # the one action moto lets through unchecked
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        tree = make_tree(tmp_path / "tree", {"train": 2})
        packed = subprocess.run([sys.executable, "-m", "orchestrator.cli", "pack", str(tree), "s3://data/packed"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert packed.returncode == 2 and "OUT" in packed.stderr and "refused the credentials" in packed.stderr, packed.stderr
        job = tmp_path / "job.yaml"
        job.write_text(json.dumps(tiny_job(tmp_path / "runs", "denied", data={
            "source": "shards:s3://data/packed", "classes": None, "max_per_class": None})))
        trained = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(job), "--local"],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert trained.returncode == 2, trained.stdout[-2000:] + trained.stderr[-2000:]
        assert "data.source" in trained.stderr and "refused the credentials" in trained.stderr
    finally:
        server.terminate()
        server.wait()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data_loader_trains_from_shards_and_refuses_a_cluster_with_no_cpu_left_to_decode(ray_session, tmp_path,
                                                                                            write_job, capsys):
    tree = make_tree(tmp_path / "tree", {"train": 16, "val": 4})
    pack(str(tree), str(tmp_path / "packed"), shard_size_mb=0.01, workers=1)
    job = tiny_job(tmp_path / "runs", "raydata", data={"source": f"shards:{tmp_path / 'packed'}", "classes": None,
                                                       "max_per_class": None, "image_size": 16, "loader": "ray_data"},
                   scaling={"num_workers": 2, "per_worker_batch_size": 4, "cpus_per_worker": 1},
                   schedule={"epochs": 2, "warmup_epochs": 0}, optim={"base_lr": 0.002})
    assert main(["train", str(write_job(job))]) == 2                  # 2 trainers x 1 CPU on 2 CPUs: none left
    err = capsys.readouterr().err
    assert "data.loader: ray_data" in err and "the cluster has 2 CPUs" in err
    job["scaling"]["cpus_per_worker"] = 0.5
    assert main(["train", str(write_job(job))]) == 0
    run = tmp_path / "runs" / "raydata"
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["step"] == 2 * (48 // 8)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    with pytest.raises(Exception, match="checkpoint_every_steps"):
        validate_spec({**job, "run": {**job["run"], "checkpoint_every_steps": 5}})


@pytest.mark.ray
@pytest.mark.slow
def test_bench_ingest_json_keys(ray_session, capsys):
    assert main(["bench", "ingest", "--images", "140", "--epochs", "1", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) == {"bound_images_per_s", "paths"} and set(figures["paths"]) == {"imagefolder", "shards", "ray_data"}
    assert figures["bound_images_per_s"] > 0 and all(rate > 0 for rate in figures["paths"].values())
