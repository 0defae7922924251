"""`orchestrator bench overhead`: what our Ray Train path costs over a plain PyTorch loop.

Same model, data and batch on one worker that owns the whole machine. Steady state: median
seconds per training epoch (each run's first epoch left out) of a plain loop written here, of
`train --local` and of `train` on Ray Train, as ratios to the plain loop and to `--local`; `--local`
and Ray alternate `repeats` rounds, because this shared CPU's speed drifts by more than the
difference measured. Start-up: seconds from command start to the first training step of
`orchestrator train`, cold (a new local Ray) and against a warm cluster (`orchestrator up`, `--address`),
next to a bare TorchTrainer whose loop does nothing (Ray's own floor), all measured in this run
(`bench startup` measures start-up alone, with the quickstart's workers). Each measured command runs
in a fresh process.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console

from orchestrator.bench.common import figures_table, run_train, warm_cluster
from orchestrator.train.progress import boot_clock, process_start_time

BARE_PATTERN = re.compile(r"bare first step ([0-9.]+) s")


BENCH_DATA = {
    "digits": "the builtin digits, in memory, 32 px",
    "png32": "an image folder of 544 PNGs of 32 px, 4 classes",
    "photos": "an image folder of 256 JPEGs of 800x600 (photo-size), 4 classes, trained at 64 px",
}
"""`bench overhead --data` choices: what the runs read"""


def bench_data(kind: str, folder: Path) -> dict:
    """The job's data section for a BENCH_DATA kind; image folders are written under `folder`."""
    if kind == "digits":
        return {"source": "builtin:digits", "image_size": 32, "augment": ["random_crop"]}
    import numpy as np
    from PIL import Image

    count, shape, suffix, size = (136, (32, 32), "png", 32) if kind == "png32" else (64, (600, 800), "jpg", 64)
    rng = np.random.default_rng(0)
    for label in range(4):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 255, 3)
        for i in range(count):
            pixels = np.clip(colour + rng.normal(0, 40, (*shape, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"c{label}" / f"{i}.{suffix}")
    return {"source": f"imagefolder:{folder}", "image_size": size, "augment": ["random_crop"], "val_fraction": 0.1}


def bench_job(storage: str, name: str, epochs: int, data: dict | None = None) -> dict:
    cpus = os.cpu_count() or 1
    return {
        "name": name, "seed": 0,
        "data": data or bench_data("digits", Path(storage)),
        "model": {"arch": "resnet18"},
        "optim": {"name": "sgd", "base_lr": 0.2, "base_batch_size": 256},
        "schedule": {"name": "cosine", "epochs": epochs, "warmup_epochs": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": cpus, "per_worker_batch_size": 64},
        "run": {"storage": storage, "max_failures": 0},
    }


def plain_loop_epoch_seconds(job: dict, epochs: int, workers: int = 0) -> list[float]:
    """A plain PyTorch loop over the same data pipeline, model and batch: seconds per epoch; `workers`
    DataLoader processes that live for the whole loop (0: loading in this process)."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from orchestrator.config.spec import JobSpec
    from orchestrator.data.loaders import make_dataset
    from orchestrator.data.sources import load_splits
    from orchestrator.data.transforms import normalize_batch

    spec = JobSpec.model_validate(job)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    splits = load_splits(spec.data, spec.seed)
    dataset = make_dataset(splits.train, spec.data, True, "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=spec.scaling.per_worker_batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    model = torchvision.models.resnet18(num_classes=splits.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    seconds = []
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        for images, labels in loader:
            if images.dtype == torch.uint8:   # the training loader hands uint8 over; the loop normalises (as ours does)
                images = normalize_batch(images, spec.data.mean, spec.data.std)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    return seconds


def run_bare(address: str | None, env: dict | None = None, workers: int = 1, cpus_per_worker: int | None = None) -> float:
    """Seconds to the first step of a bare TorchTrainer (`bare_trainer_main`) in a fresh process."""
    cpus = cpus_per_worker or os.cpu_count() or 1
    command = [sys.executable, "-m", "orchestrator.bench.overhead", "bare", address or "local", str(workers), str(cpus)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    match = BARE_PATTERN.search(done.stdout)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"bare TorchTrainer failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return float(match.group(1))


def bare_trainer_main(address: str | None, workers: int = 1, cpus_per_worker: int | None = None) -> None:
    """Ray's floor: import torch, start or join Ray, fit a TorchTrainer whose loop does nothing."""
    import ray
    import torch  # noqa: F401  (our CLI pays for it too)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    ray.init(address=address, log_to_driver=False, configure_logging=False)   # "local": a new Ray
    events = Queue()

    def loop(config):
        config["queue"].put(boot_clock())

    with tempfile.TemporaryDirectory() as storage:
        TorchTrainer(loop, train_loop_config={"queue": events},
                     scaling_config=ScalingConfig(num_workers=workers,
                                                  resources_per_worker={"CPU": cpus_per_worker or os.cpu_count() or 1}),
                     run_config=RunConfig(storage_path=storage, name="bare")).fit()
    print(f"bare first step {events.get(timeout=60) - process_start_time():.2f} s", flush=True)


def overhead(console: Console, epochs: int = 6, repeats: int = 2, data: str = "digits", compiled: bool = False) -> dict:
    """Run every measurement and print the tables; returns the figures. `data`: a BENCH_DATA kind;
    `compiled`: also time `train --local` with model.compile (inductor; its first epoch, which compiles,
    left out like every first epoch)."""
    figures: dict = {"data": data}
    with tempfile.TemporaryDirectory() as workdir:
        storage = str(Path(workdir) / "runs")
        data_section = bench_data(data, Path(workdir) / "images")

        def job_file(name: str, **model) -> Path:
            job = bench_job(storage, name, epochs, data_section)
            job["model"].update(model)
            path = Path(workdir) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(job))
            return path

        # The shared CPU's speed drifts, so the plain loop is measured before and after the others, and
        # --local and Ray alternate `repeats` times: per-epoch figures are medians over every round
        # (each run's first epoch left out), start-up figures the fastest round. The plain loop is its
        # best loader setting: in-process, or persistent workers on every CPU but one.
        plain = _best_plain(console, bench_job(storage, "plain", epochs, data_section), epochs)
        local_first, local_epochs, ray_epochs, compiled_epochs = [], [], [], []
        cold_bare, cold_ours, warm_bare, warm_ours = [], [], [], []
        for repeat in range(repeats):
            console.print(f"round {repeat + 1} of {repeats}: orchestrator train --local, bare TorchTrainer, "
                          "orchestrator train on a new local Ray ...")
            first_step_s, epoch_s = run_train(job_file(f"local_{repeat}"), ["--local"])
            local_first.append(first_step_s)
            local_epochs += epoch_s[1:]
            cold_bare.append(run_bare(None))
            first_step_s, epoch_s = run_train(job_file(f"ray_cold_{repeat}"), [])
            cold_ours.append(first_step_s)
            ray_epochs += epoch_s[1:]
            if compiled:
                console.print("orchestrator train --local with model.compile: true (inductor) ...")
                compiled_epochs += run_train(job_file(f"compiled_{repeat}", compile=True), ["--local"])[1][1:]
        console.print("starting a warm local cluster (orchestrator up) ...")
        with warm_cluster(Path(workdir) / "cluster") as (address, env):
            for repeat in range(repeats):
                console.print(f"warm start-up against {address}, round {repeat + 1} of {repeats} ...")
                warm_bare.append(run_bare(address, env))
                warm_ours.append(run_train(job_file(f"ray_warm_{repeat}"), ["--address", address], env)[0])
        plain_after = _best_plain(console, bench_job(storage, "plain", epochs, data_section), epochs)
    figures.update(plain_epoch_s=plain + plain_after, local_epoch_s=local_epochs, ray_epoch_s=ray_epochs,
                   local_first_step_s=min(local_first), bare_cold_s=min(cold_bare), ray_cold_first_step_s=min(cold_ours),
                   bare_warm_s=min(warm_bare), ray_warm_first_step_s=min(warm_ours))
    if compiled:
        figures["compiled_epoch_s"] = compiled_epochs
    print_overhead(console, figures)
    return figures


def _best_plain(console: Console, job: dict, epochs: int) -> list[float]:
    """The plain loop's epochs (the first left out) with its faster loader setting (by median)."""
    cpus = os.cpu_count() or 1
    tried = {}
    for workers in sorted({0, max(0, cpus - 1)}):
        console.print(f"plain PyTorch loop, {epochs} epochs, {workers} loader processes ...")
        tried[workers] = plain_loop_epoch_seconds(job, epochs, workers)[1:]
    return min(tried.values(), key=statistics.median)


def print_overhead(console: Console, f: dict) -> None:
    medians = {key: statistics.median(f[key]) for key in ("plain_epoch_s", "local_epoch_s", "ray_epoch_s")}
    table = figures_table(f"steady state on {BENCH_DATA[f.get('data', 'digits')]}: seconds per training epoch (median over "
                          "every round, first epoch of each run left out; plain loop measured before and after the others)",
                          ("path", "s/epoch", "ratio to plain loop", "ratio to --local"))
    rows = [("plain PyTorch loop (its best loader setting)", "plain_epoch_s"), ("orchestrator train --local", "local_epoch_s"),
            ("orchestrator train (Ray Train, 1 worker)", "ray_epoch_s")]
    if f.get("compiled_epoch_s"):
        medians["compiled_epoch_s"] = statistics.median(f["compiled_epoch_s"])
        rows.append(("orchestrator train --local, model.compile: true", "compiled_epoch_s"))
    for label, key in rows:
        value = medians[key]
        table.add_row(label, f"{value:.3f}", f"{value / medians['plain_epoch_s']:.3f}", f"{value / medians['local_epoch_s']:.3f}")
    console.print(table)
    start = figures_table("start-up: seconds from command start to the first training step (best of the rounds)",
                          ("", "cold (new local Ray)", "warm (--address)"))
    start.add_row("bare TorchTrainer (Ray's floor)", f"{f['bare_cold_s']:.1f}", f"{f['bare_warm_s']:.1f}")
    start.add_row("orchestrator train", f"{f['ray_cold_first_step_s']:.1f}", f"{f['ray_warm_first_step_s']:.1f}")
    start.add_row("difference", f"{f['ray_cold_first_step_s'] - f['bare_cold_s']:+.1f}", f"{f['ray_warm_first_step_s'] - f['bare_warm_s']:+.1f}")
    start.add_row("orchestrator train --local", f"{f['local_first_step_s']:.1f}", "")
    console.print(start)
    console.print("goal: Ray Train with 1 worker within 5% of --local per epoch")




if __name__ == "__main__":
    if sys.argv[1:2] == ["bare"]:
        bare_trainer_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
