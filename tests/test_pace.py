"""Issue 23: loaders that live for the run, the loader count picked from a measurement, the data-stall
line, `doctor`, and model.compile."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_job
from PIL import Image

from orchestrator.cli import main
from orchestrator.config.jobfile import validate_spec
from orchestrator.config.spec import DataSpec
from orchestrator.data.loaders import start_epoch, train_loader
from orchestrator.train.pace import choose_workers, predicted_step_s, share_cpus, stall_line


class Pids(torch.utils.data.Dataset):
    """Each item is the pid of the process that made it."""

    def __len__(self):
        return 32

    def __getitem__(self, index):
        return torch.tensor([os.getpid()]), 0


def test_loader_workers_live_for_the_whole_run():
    plan = validate_spec(tiny_job("/tmp/unused", "pids", scaling={"num_workers": 1, "per_worker_batch_size": 4}))
    from orchestrator.config.plan import make_plan

    loader = train_loader(Pids(), DataSpec(), make_plan(plan, 32, 1), 0, 0, workers=2)
    seen = []
    for epoch in range(3):
        start_epoch(loader, epoch)
        seen.append({int(pid) for images, _ in loader for pid in images.flatten()})
    assert len(seen[0]) == 2 and seen[0] == seen[1] == seen[2] and os.getpid() not in seen[0]


def test_a_stream_s_living_workers_follow_the_epoch(tmp_path):
    from test_shards import make_tree

    from orchestrator.data.pack import pack
    from orchestrator.data.packed import packed_split
    from orchestrator.data.shards import read_manifest
    from orchestrator.data.streaming import ShardTrainStream

    tree = make_tree(tmp_path / "tree", {"train": 40}, size=4, ids=True)
    pack(str(tree), str(tmp_path / "packed"), shard_size_mb=0.001, workers=1, row_group_mb=0.0005)
    split = packed_split(read_manifest(str(tmp_path / "packed")), str(tmp_path / "packed"), "train")

    def batches(loader) -> list:
        return [images[:, :2, 0, 0].tolist() for images, _ in loader]

    def stream():
        return ShardTrainStream(split, lambda image: image, 4, 10, 0, 1, seed=3)

    fresh = []
    for epoch in (0, 1):
        one = stream()
        one.set_epoch(epoch)
        fresh.append(batches(torch.utils.data.DataLoader(one, batch_size=None, num_workers=2)))
    living = stream()
    loader = torch.utils.data.DataLoader(living, batch_size=None, num_workers=2, persistent_workers=True)
    kept = []
    for epoch in (0, 1):
        living.set_epoch(epoch)
        kept.append(batches(loader))
    assert kept == fresh and fresh[0] != fresh[1]

    # in one process: the last chunk of epoch 0 starts reading epoch 1's first, which epoch 1 (plain, or a
    # resume that skips batches) takes instead of reading it again
    in_process = []
    for epoch in (0, 1):
        alone = stream()
        alone.set_epoch(epoch)
        in_process.append(batches(alone))
    one = stream()
    one.set_epoch(0)
    assert batches(one) == in_process[0] and one._ahead[0][0] == 1
    reads = []
    one._pool_here().submit(lambda: None).result()
    original = one._kept_reader.rows
    one._kept_reader.rows = lambda parts: reads.append(parts) or original(parts)
    one.set_epoch(1, 2)
    assert batches(one) == in_process[1][2:] and one._ahead[0][0] == 2
    one._ahead[1].result()
    assert len(reads) == 1                 # epoch 2's read ahead only: epoch 1 read nothing of its own


@pytest.mark.parametrize("data_ms, step_ms, cpus, on_cpu, expected", [
    (3, 50, 2, True, 0),       # 32 px PNGs on this machine: a loader would take a core from the step
    (60, 50, 2, True, 1),      # decoding costs more than the step: one loader process
    (0, 50, 8, True, 0),
    (40, 10, 8, False, 4),     # a GPU step: enough loaders to hide decoding (40 / 10)
    (40, 10, 3, False, 2),     # ... as many as there are spare CPUs
])
def test_the_loader_count_that_makes_a_step_shortest(data_ms, step_ms, cpus, on_cpu, expected):
    assert choose_workers(data_ms / 1e3, step_ms / 1e3, cpus, on_cpu) == expected


def test_predicted_step_time_counts_the_core_a_loader_takes():
    assert predicted_step_s(0, 0.01, 0.05, 2, True) == pytest.approx(0.06)
    assert predicted_step_s(1, 0.01, 0.05, 2, True) == pytest.approx(0.10)    # the step on 1 of 2 cores
    assert predicted_step_s(1, 0.01, 0.05, 2, False) == pytest.approx(0.05)


def test_the_step_gets_the_cpus_the_loader_processes_leave():
    before = torch.get_num_threads()
    try:
        assert share_cpus(4, 1, torch.device("cpu")) == "torch threads: 3 (scaling.cpus_per_worker 4 less 1 loader process(es))"
        assert torch.get_num_threads() == 3
        share_cpus(2, 3, torch.device("cpu"))
        assert torch.get_num_threads() == 1                      # never below one
        torch.set_num_threads(before)
        assert share_cpus(4, 0, torch.device("cpu")) is None and share_cpus(4, 2, torch.device("cuda")) is None
        assert torch.get_num_threads() == before                 # in-process loading or a GPU: unchanged
    finally:
        torch.set_num_threads(before)


def test_a_stall_line_names_the_wait_and_the_knobs():
    spec = validate_spec(tiny_job("/tmp/unused", "stall", data={"source": "imagefolder:/x"}))
    row = {"epoch": 2, "data_wait_s": 3.0, "train_s": 10.0}
    line = stall_line(row, spec, workers=1)
    assert "epoch 3 waited 3.0 s of its 10.0 s of training (30%)" in line
    assert "data.loader_workers (now 1" in line and "--max-side" in line and "orchestrator doctor" in line
    assert stall_line({**row, "data_wait_s": 1.0}, spec, 1) is None


def big_jpegs(root, per_class: int = 24, side: int = 1600):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg", quality=90)
    return root


@pytest.mark.slow
def test_doctor_names_decoding_on_a_decode_bound_job(tmp_path, write_job, capsys):
    root = big_jpegs(tmp_path / "photos")
    job = tiny_job(tmp_path / "runs", "photos", model={"arch": "mobilenet_v3_small"},
                   data={"source": f"imagefolder:{root}", "classes": None, "max_per_class": None, "image_size": 32,
                         "loader_workers": 1},
                   scaling={"num_workers": 1, "per_worker_batch_size": 8, "cpus_per_worker": 2})
    assert main(["doctor", str(write_job(job)), "--steps", "4", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert set(found) == {"images_per_s", "data_wait_fraction", "stages", "advice"}
    assert set(found["stages"]) == {"read_ms", "decode_ms", "augment_ms", "to_device_ms", "step_ms"}
    assert found["data_wait_fraction"] > 0.15 and found["advice"][0].startswith("bottleneck: decode"), json.dumps(found)


@pytest.mark.slow
def test_doctor_names_the_step_on_a_compute_bound_job(tmp_path, write_job, capsys):
    job = tiny_job(tmp_path / "runs", "compute", model={"arch": "resnet50"},
                   data={"source": "builtin:digits", "image_size": 64},
                   scaling={"num_workers": 1, "per_worker_batch_size": 8})
    assert main(["doctor", str(write_job(job)), "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "bottleneck: the step" in out and "model.compile: true" in out


def test_every_epoch_records_its_wait_for_data(tmp_path, write_job):
    import pyarrow.parquet as pq

    job = tiny_job(tmp_path / "runs", "waits", scaling={"num_workers": 1}, optim={"base_lr": 0.01})
    assert main(["train", str(write_job(job)), "--local"]) == 0
    rows = pq.read_table(tmp_path / "runs" / "waits" / "metrics.parquet").to_pylist()
    assert all(0 <= row["data_wait_s"] < row["train_s"] for row in rows)


def test_an_unknown_compile_backend_exits_2_before_training(tmp_path, write_job, capsys):
    job = tiny_job(tmp_path / "runs", "compiled", model={"arch": "resnet18", "compile": {"backend": "nonesuch"}},
                   scaling={"num_workers": 1})
    assert main(["train", str(write_job(job)), "--local"]) == 2
    assert "model.compile.backend: 'nonesuch' is not a torch.compile backend here" in capsys.readouterr().err


@pytest.mark.slow
def test_a_compiled_model_trains_resumes_and_saves_plain_names(tmp_path, write_job, capsys):
    """aot_eager: dynamo and AOT autograd trace the model as inductor would, without building kernels
    (inductor's C++ build takes minutes on this machine's 2 cores; `bench overhead` times it)."""
    from safetensors.torch import load_file

    job = tiny_job(tmp_path / "runs", "compiled", model={"arch": "resnet18", "compile": {"backend": "aot_eager"}},
                   optim={"base_lr": 0.01}, scaling={"num_workers": 1}, schedule={"epochs": 1, "warmup_epochs": 0})
    path = write_job(job)
    assert main(["train", str(path), "--local"]) == 0
    assert "model.compile: the forward is compiled in place" in capsys.readouterr().out
    names = list(load_file(tmp_path / "runs" / "compiled" / "model.safetensors"))
    assert "conv1.weight" in names and not any("_orig_mod" in name for name in names)
    assert main(["train", str(path), "--local", "--set", "schedule.epochs=2"]) == 0      # resumes into a compiled model
    summary = json.loads((tmp_path / "runs" / "compiled" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2


def test_device_decoding_gives_the_cpu_path_s_batches(tmp_path):
    """data.decode: gpu on a CPU device runs the same code as on a GPU: its batches equal the loaders' own."""
    from test_shards import make_tree

    from orchestrator.config.plan import make_plan
    from orchestrator.data.device_decode import DeviceDecoded
    from orchestrator.data.loaders import make_dataset
    from orchestrator.data.pack import pack
    from orchestrator.data.sources import load_splits

    tree = make_tree(tmp_path / "tree", {"train": 12, "val": 2}, size=40)
    pack(str(tree), str(tmp_path / "packed"), shard_size_mb=0.01, workers=1)
    batches = {}
    for decode in ("cpu", "gpu"):
        job = validate_spec(tiny_job(tmp_path / "runs", decode, scaling={"num_workers": 1, "per_worker_batch_size": 4},
                                     data={"source": f"shards:{tmp_path / 'packed'}", "classes": None, "max_per_class": None,
                                           "image_size": 24, "augment": ["random_resized_crop", "hflip"],
                                           "decode": decode}))
        splits = load_splits(job.data, 0)
        dataset = make_dataset(splits.train, job.data, True, "train")
        loader = train_loader(dataset, job.data, make_plan(job, len(splits.train), 1), 0, 0, 3, workers=1)
        start_epoch(loader, 1)
        if decode == "gpu":
            loader = DeviceDecoded(loader, dataset.transform, torch.device("cpu"))
        batches[decode] = [(images.clone(), labels.clone()) for images, labels in loader]
    assert len(batches["cpu"]) == len(batches["gpu"]) > 2
    for (a, la), (b, lb) in zip(batches["cpu"], batches["gpu"]):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_device_decoding_trains_and_is_refused_where_it_cannot_work(tmp_path, write_job, capsys):
    from test_shards import make_tree

    from orchestrator.data.pack import pack

    tree = make_tree(tmp_path / "tree", {"train": 16, "val": 4}, size=24)
    pack(str(tree), str(tmp_path / "packed"), shard_size_mb=0.01, workers=1)
    data = {"source": f"shards:{tmp_path / 'packed'}", "classes": None, "max_per_class": None, "decode": "gpu"}
    job = tiny_job(tmp_path / "runs", "devdecode", data=data, optim={"base_lr": 0.01}, scaling={"num_workers": 1},
                   schedule={"epochs": 1, "warmup_epochs": 0})
    assert main(["train", str(write_job(job)), "--local"]) == 0
    refused = tiny_job(tmp_path / "runs", "nope", data={"decode": "gpu", "mixup_alpha": 0.2})
    assert main(["validate", str(write_job(refused, "nope.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "data.decode: gpu decodes packed shards" in err and "data.decode: gpu does not mix batches" in err


def test_bench_gpu_json_keys_on_this_machine(capsys):
    assert main(["bench", "gpu", "--arch", "resnet18", "--batch", "4", "--image-size", "32", "--steps", "2", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) == {"bound_images_per_s", "images_per_s", "ratio", "data_wait_fraction"}
    assert figures["bound_images_per_s"] > 0 and 0 < figures["ratio"] and 0 <= figures["data_wait_fraction"] < 1
