"""`orchestrator bench NAME`: the benchmarks, one table of them (`BENCHMARKS`: the name, what it measures,
how it runs); each prints its figures as ratios to a baseline measured in the same run."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.cli.common import console, err_console


def _overhead(args) -> None:
    from orchestrator.bench.overhead import overhead

    overhead(console, epochs=args.epochs or 6, repeats=args.repeats, data=args.data, compiled=args.compile)


def _reliability(args) -> None:
    from orchestrator.bench.reliability import reliability

    reliability(console, runs=args.runs)


def _sweep(args) -> None:
    from orchestrator.bench.sweep import sweep_bench
    from orchestrator.store.storage import strict_json

    figures = sweep_bench(err_console if args.json else console)
    if args.json:
        print(strict_json({key: figures[key] for key in ("epochs_ratio", "wall_ratio", "best_gap_points")}))


def _search(args) -> None:
    from orchestrator.bench.search import search_bench
    from orchestrator.store.storage import strict_json

    from pathlib import Path

    figures = search_bench(err_console if args.json else console, epochs=args.epochs or 5, seeds=args.seeds or 10,
                           landscape_path=Path(args.landscape) if args.landscape else None)
    if args.json:
        print(strict_json({"grid_best": figures["grid_best"], **{m: {"epochs_to_target": figures[m]["epochs_to_target"],
                                                                     "reached": figures[m]["reached"]}
                                                                 for m in ("random", "tpe")}}))


def _large_batch(args) -> None:
    import dataclasses

    from orchestrator.bench.large_batch import PRESETS, WARMUP_EPOCHS, large_batch
    from orchestrator.config.errors import SpecError

    if args.epochs is not None and args.epochs <= WARMUP_EPOCHS:
        raise SpecError([f"--epochs: {args.epochs}; large-batch warms up over {WARMUP_EPOCHS:g} epoch(s), "
                         f"so give at least {WARMUP_EPOCHS + 1:g}"])
    preset = PRESETS[args.preset]
    preset = dataclasses.replace(preset, epochs=args.epochs or preset.epochs, train_images=args.images or preset.train_images)
    large_batch(err_console if args.json else console, preset, seeds=args.seeds, as_json=args.json, plot_path=args.plot)


def _startup(args) -> None:
    from orchestrator.bench.startup import KEYS, print_startup, startup
    from orchestrator.store.storage import strict_json

    figures = startup(err_console if args.json else console, repeats=args.repeats)
    if args.json:
        print(strict_json({key: figures[key] for key in KEYS}))
    else:
        print_startup(console, figures)


def _ingest(args) -> None:
    from orchestrator.bench.ingest import ingest, print_ingest
    from orchestrator.store.storage import strict_json

    figures = ingest(err_console if args.json else console, images=args.images or 2000, epochs=args.epochs or 2)
    if args.json:
        print(strict_json({"bound_images_per_s": figures["bound_images_per_s"], "paths": figures["paths"]}))
        err_console.print(f"shards: a loader worker's peak private memory {figures['loader_worker_private_mb']:.0f} MB")
    else:
        print_ingest(console, figures)


def _gpu(args) -> None:
    from orchestrator.bench.gpu import gpu_bench, print_gpu
    from orchestrator.store.storage import strict_json

    figures = gpu_bench(err_console if args.json else console, arch=args.arch, batch=args.batch,
                        size=args.image_size, steps=args.steps, compiled=args.compile)
    if args.json:
        print(strict_json({key: figures[key] for key in ("bound_images_per_s", "images_per_s", "ratio",
                                                         "data_wait_fraction")}))
    else:
        print_gpu(console, figures)


@dataclass(frozen=True)
class Benchmark:
    measures: str
    """what it measures, against what (the --help line)"""
    run: Callable[[argparse.Namespace], None]


BENCHMARKS = {
    "overhead": Benchmark("Ray Train and --local vs a plain PyTorch loop, per epoch and at start-up", _overhead),
    "reliability": Benchmark("kill a worker mid-run R times, count completed runs, epochs lost or repeated", _reliability),
    "sweep": Benchmark("the same 16 configurations under ASHA and at full budget", _sweep),
    "search": Benchmark("random + ASHA vs TPE + ASHA on a measured LR x weight-decay grid: epochs until a trial is within "
                        "0.5 points of the grid's best", _search),
    "large-batch": Benchmark("a miniature of Goyal et al.'s table in its regime: B0 to 16 x B0, warmup, LARS, LAMB, steps to target",
                             _large_batch),
    "startup": Benchmark("seconds to the first step of a plain script, --local, and bare TorchTrainer vs ours on a new "
                         "and on a warm Ray", _startup),
    "ingest": Benchmark("images/s that imagefolder, shards and Ray Data deliver to a loop vs decode + augment alone", _ingest),
    "gpu": Benchmark("training images/s through packed shards (decoded on the GPU) vs tensors already on the device",
                     _gpu),
}
"""orchestrator bench NAME -> the benchmark (its code: orchestrator/bench/)"""


def cmd_bench(args) -> int:
    BENCHMARKS[args.what].run(args)
    return 0


def add_bench(p: argparse.ArgumentParser) -> None:
    """benchmarks that print their figures as ratios to a baseline measured in the same run"""
    p.add_argument("what", choices=list(BENCHMARKS),
                   help="; ".join(f"{name}: {bench.measures}" for name, bench in BENCHMARKS.items()))
    p.add_argument("--runs", type=int, default=3, help="reliability: runs with a killed worker")
    p.add_argument("--epochs", type=int, default=None, help="epochs per measured run (overhead: 6, the first left out "
                                                                  "of the median; large-batch: 12; ingest: 2 passes; search: 5)")
    p.add_argument("--seeds", type=int, default=None, help="large-batch: seeds per row (cpu preset 2, gpu 3); search: sweep "
                                                           "seeds per method (10)")
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu",
                   help="large-batch: cpu (timm test_resnet, 6,400 glyphs, B0 16; ~35 min on 2 cores) or gpu "
                        "(resnet18, 51,200 glyphs, B0 128, 3 seeds)")
    p.add_argument("--images", type=int, default=None, help="large-batch: training images (default: the preset's; val and "
                                                                 "test a quarter each); ingest: generated JPEGs (default 2,000)")
    p.add_argument("--json", action="store_true", help='print the figures as JSON (progress goes to stderr): large-batch '
                   '{"rows": [...]}; startup {"plain_s", "local_s", "bare_fresh_s", "ours_fresh_s", "bare_warm_s", "ours_warm_s"}; '
                   'sweep {"epochs_ratio", "wall_ratio", "best_gap_points"}; search {"grid_best", "random": {"epochs_to_target", '
                   '"reached"}, "tpe": {...}}; ingest {"bound_images_per_s", "paths": '
                   '{"imagefolder", "shards", "ray_data"}}; gpu {"bound_images_per_s", "images_per_s", "ratio", "data_wait_fraction"}')
    p.add_argument("--landscape", help="search: a JSON file for the measured landscape: read when it holds one of the "
                                       "same settings (no training), else written")
    p.add_argument("--plot", default="large_batch.png", help="large-batch: where to write the error-vs-batch PNG")
    p.add_argument("--data", choices=["digits", "png32", "photos"], default="digits",
                   help="overhead: digits (in memory), png32 (544 PNGs of 32 px), photos (256 JPEGs of 800x600 at 64 px)")
    p.add_argument("--compile", action="store_true",
                   help="overhead: add --local with model.compile: true (inductor); gpu: compile the model")
    p.add_argument("--arch", default="resnet50", help="gpu: the model (default resnet50)")
    p.add_argument("--batch", type=int, default=64, help="gpu: images per step (default 64)")
    p.add_argument("--image-size", type=int, default=224, help="gpu: side of the training crops, px (default 224)")
    p.add_argument("--steps", type=int, default=30, help="gpu: timed steps per path (default 30)")
    p.add_argument("--repeats", type=int, default=2, help="overhead, startup: start-up rounds, cold and warm (the best is kept)")
