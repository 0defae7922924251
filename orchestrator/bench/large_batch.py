"""`orchestrator bench large-batch`: a miniature of Goyal et al. (2017) in the regime their rule is about.

The same model, data and epochs at global batch B0 and 2x, 4x, 8x, 16x B0, the LR scaled linearly
from B0's and warmed up gradually over the first epoch(s) from B0's LR (the paper's protocol: equal
epochs, k times fewer steps); the largest batch also without warmup, with LARS and with LAMB. Every
row takes at least 300 optimizer steps (the largest batch) and B0 at least 4,800. Every forward pass
sees the same micro-batch (the paper's 32 images per GPU: BatchNorm's statistics are over the same
number of images in every row); the large batches are those micro-batches accumulated in one process.

Beside the table, Shallue et al. (2018)'s measure: the optimizer steps each batch size needs to first
reach a target validation accuracy (B0's final, less one point), on a log-log plot against the batch
with the perfect-scaling line (steps halve when the batch doubles).

LARS and LAMB are set by rules stated before any run, not tuned on the table: LARS uses You et al.
(2017)'s trust coefficient 0.001 with the same linearly scaled LR as SGD (SimCLR's and BYOL's rule)
and polynomial decay (power 2); LAMB uses Adam's LR 0.001 at batch 256, scaled with the square root of
the batch (You et al. 2019), polynomial decay (power 2). Both leave norm weights and biases out of the
trust ratio and the weight decay (`train.optim`). Each run is `fit` in this process, so the data is
generated once.
"""

from __future__ import annotations

import io
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

FACTORS = (1, 2, 4, 8, 16)
"""global batches as multiples of B0; the largest also runs without warmup, with LARS and with LAMB"""
MIN_STEPS = 300
"""optimizer steps the largest batch takes at least (the paper's 8k run: 14,040)"""
WARMUP_EPOCHS = 1.0
"""the paper warms up 5 of 90 epochs; ours 1 of 12 (a ramp of at least 25 steps at 16x)"""
SGD_LR_PER_256 = 0.4
"""SGD's LR per 256 images (0.025 at B0 = 16, 0.4 at 16x); momentum 0.9, cosine decay"""
LAMB_LR_PER_256 = 0.001
"""Adam's customary LR, at batch 256, scaled by sqrt(batch / 256)"""
TARGET_GAP = 0.01
"""the steps-to-target measure's target: B0's final validation accuracy less this"""


@dataclass(frozen=True)
class Preset:
    """The data, model and sizes of one version of the table."""

    arch: str
    image_size_px: int
    num_classes: int
    noise_std: float
    """glyphs' pixel noise (0-255 units): what keeps B0's test error between 5 and 20%"""
    clutter_strokes: int
    train_images: int
    epochs: int
    b0: int
    """the small global batch and every row's micro-batch (images per forward pass)"""
    seeds: int


PRESETS = {
    # 2 cores: timm's test_resnet (BatchNorm, zero-init last BN per block, 0.4M parameters) is ~850 images/s at
    # micro-batch 16, 3x MobileNetV3-small; 8 rows x 2 seeds x 76,800 images fit in about 35 minutes.
    "cpu": Preset("timm/test_resnet", 24, 32, 64.0, 6, 6_400, 12, 16, 2),
    # a lent GPU: resnet18 at 32 px on 50,000 glyph images, B0 = 128 (2,048 at 16x), 3 seeds
    "gpu": Preset("resnet18", 32, 32, 64.0, 6, 51_200, 12, 128, 3),
}


@dataclass(frozen=True)
class Config:
    global_batch_size: int
    warmup_epochs: float
    optimizer: str


def configs(b0: int) -> list[Config]:
    """The table's rows: B0..16 x B0 with warmup (none at B0), then 16 x B0 without warmup, with LARS, with LAMB."""
    largest = FACTORS[-1] * b0
    return ([Config(b0 * k, WARMUP_EPOCHS if k > 1 else 0.0, "sgd") for k in FACTORS]
            + [Config(largest, 0.0, "sgd"), Config(largest, WARMUP_EPOCHS, "lars"), Config(largest, WARMUP_EPOCHS, "lamb")])


def _optim(config: Config) -> dict:
    common = {"name": config.optimizer, "base_batch_size": 256, "weight_decay": 5e-5, "norm_bias_weight_decay": 0.0}
    if config.optimizer == "lamb":
        return {**common, "base_lr": LAMB_LR_PER_256, "lr_scaling": "sqrt"}
    return {**common, "base_lr": SGD_LR_PER_256, "momentum": 0.9, "trust_coeff": 0.001}


def job(config: Config, seed: int, storage: str, preset: Preset) -> dict:
    """The job of one row and seed: warmup ramps from B0's LR (start factor B0 / batch, as the paper's)."""
    b0 = preset.b0
    return {
        "name": f"b{config.global_batch_size}_w{config.warmup_epochs:g}_{config.optimizer}_s{seed}", "seed": seed,
        "data": {"source": "synthetic", "image_size": preset.image_size_px, "augment": ["random_crop"],
                 "val_fraction": 0.0, "loader_workers": 0,
                 "synthetic": {"kind": "glyphs", "num_classes": preset.num_classes, "train_samples": preset.train_images,
                               "val_samples": preset.train_images // 4, "test_samples": preset.train_images // 4,
                               "noise_std": preset.noise_std, "clutter_strokes": preset.clutter_strokes}},
        "model": {"arch": preset.arch, "head_init": "default"},
        "optim": _optim(config),
        "schedule": {**({"name": "cosine"} if config.optimizer == "sgd" else {"name": "poly", "power": 2.0}),
                     "epochs": preset.epochs, "warmup_epochs": config.warmup_epochs,
                     "warmup_start_factor": b0 / config.global_batch_size if config.warmup_epochs else 1.0},
        "scaling": {"num_workers": 1, "per_worker_batch_size": b0, "grad_accum_steps": config.global_batch_size // b0},
        "run": {"storage": storage, "max_failures": 0, "keep_checkpoints": 1},
    }


@dataclass
class Result:
    config: Config
    seed: int
    scaled_lr: float
    test_acc1: float | None
    optimizer_steps: int
    curve: list[tuple[int, float]]
    """(optimizer steps done, validation acc@1) after each epoch"""
    status: str
    wall_s: float


def run_one(config: Config, seed: int, storage: str, preset: Preset) -> Result:
    """Train one row in this process, quietly: its plan's LR and steps, the validation curve, test acc@1."""
    from orchestrator.cluster.launch import train_local
    from orchestrator.config.jobfile import validate_spec
    from orchestrator.store.runs import read_metrics
    from orchestrator.store.storage import RunFolder
    from orchestrator.train.resolve import resolve_plan

    spec = validate_spec(job(config, seed, storage, preset))
    plan = resolve_plan(spec, 1).plan
    started = time.perf_counter()
    summary, _ = train_local(spec, plan, Console(file=io.StringIO()))
    curve = [(int(row["step"]), float(row["val_acc1"])) for row in read_metrics(RunFolder(storage, spec.name))]
    return Result(config, seed, plan.scaled_lr, summary.get("test_acc1"), plan.total_steps, curve, summary["status"],
                  time.perf_counter() - started)


def _runs(results: list[Result], config: Config) -> list[Result]:
    return [r for r in results if r.config == config]


def mean_curve(runs: list[Result]) -> list[tuple[int, float]]:
    """The seeds' validation curves averaged epoch by epoch (as far as the shortest goes)."""
    length = min(len(r.curve) for r in runs)
    return [(runs[0].curve[i][0], statistics.mean(r.curve[i][1] for r in runs)) for i in range(length)]


def target_val_acc1(results: list[Result], b0: int) -> float:
    """B0's final validation accuracy (mean over seeds) less TARGET_GAP."""
    return mean_curve(_runs(results, Config(b0, 0.0, "sgd")))[-1][1] - TARGET_GAP


def steps_to_target(runs: list[Result], target: float) -> int | None:
    """Optimizer steps at the first epoch end where the seeds' mean validation accuracy reaches target; None: never."""
    return next((step for step, acc in mean_curve(runs) if acc >= target), None)


def scaling_slope(points: list[tuple[int, int]]) -> float | None:
    """Least-squares slope of log(steps) against log(batch) over (batch, steps) points; -1 is perfect scaling."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(b) for b, _ in points], [math.log(s) for _, s in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summarize(results: list[Result], b0: int) -> dict:
    """`--json`: {"rows": [{global_batch_size, warmup_epochs, optimizer, test_acc1 (mean over seeds, a fraction),
    test_acc1_std, optimizer_steps, steps_to_target}], "target_val_acc1", "steps_to_target_slope"}; the slope
    over the SGD rows with warmup (and B0) that reach the target."""
    target = target_val_acc1(results, b0)
    rows = []
    for config in dict.fromkeys(r.config for r in results):
        runs = _runs(results, config)
        accs = [r.test_acc1 for r in runs if r.test_acc1 is not None]
        rows.append({"global_batch_size": config.global_batch_size, "warmup_epochs": config.warmup_epochs,
                     "optimizer": config.optimizer, "test_acc1": statistics.mean(accs) if accs else None,
                     "test_acc1_std": statistics.stdev(accs) if len(accs) > 1 else None,
                     "optimizer_steps": runs[0].optimizer_steps, "steps_to_target": steps_to_target(runs, target)})
    scaled = [(r["global_batch_size"], r["steps_to_target"]) for r in rows if r["optimizer"] == "sgd"
              and (r["warmup_epochs"] or r["global_batch_size"] == b0) and r["steps_to_target"]]
    return {"rows": rows, "target_val_acc1": target, "steps_to_target_slope": scaling_slope(scaled)}


def table(summary: dict, results: list[Result], b0: int) -> Table:
    """The paper's shape: batch, LR, warmup, optimizer, steps, test error (mean +- sd over seeds), steps to target."""
    out = Table(title=f"bench large-batch: test error, same epochs for every row; target val acc@1 "
                      f"{summary['target_val_acc1']:.4f}", title_justify="left")
    for column in ("global batch", "LR", "warmup epochs", "optimizer", "steps", "test error %", "steps to target",
                   "seeds", "wall s"):
        out.add_column(column, justify="right")
    for row, config in zip(summary["rows"], dict.fromkeys(r.config for r in results)):
        runs = _runs(results, config)
        error = "n/a" if row["test_acc1"] is None else f"{100 * (1 - row['test_acc1']):.2f}"
        if row["test_acc1_std"] is not None:
            error += f" +- {100 * row['test_acc1_std']:.2f}"
        out.add_row(f"{config.global_batch_size} ({config.global_batch_size // b0}x)", f"{runs[0].scaled_lr:.4g}",
                    f"{config.warmup_epochs:g}", config.optimizer, str(row["optimizer_steps"]), error,
                    str(row["steps_to_target"] or "never"), str(len(runs)), f"{statistics.mean(r.wall_s for r in runs):.0f}")
    return out


def _sgd_with_warmup(row: dict, b0: int) -> bool:
    return row["optimizer"] == "sgd" and bool(row["warmup_epochs"] or row["global_batch_size"] == b0)


def plot(summary: dict, b0: int, path: Path) -> None:
    """Two panels: test error against batch (log2), and steps to target against batch (log-log) with the
    perfect-scaling line through B0's point."""
    from orchestrator.after.report import figure_png, new_figure

    fig, left = new_figure(11.0, 4.0)
    left.remove()
    left, right = fig.subplots(1, 2)
    rows = summary["rows"]
    series = {"SGD, gradual warmup": lambda r: _sgd_with_warmup(r, b0),
              "SGD, no warmup": lambda r: r["optimizer"] == "sgd" and not _sgd_with_warmup(r, b0),
              "LARS": lambda r: r["optimizer"] == "lars", "LAMB": lambda r: r["optimizer"] == "lamb"}
    for (label, chosen), style in zip(series.items(), ("o-", "s", "^", "v")):
        points = [(r["global_batch_size"], r) for r in rows if chosen(r) and r["test_acc1"] is not None]
        left.plot([b for b, _ in points], [100 * (1 - r["test_acc1"]) for _, r in points], style, label=label)
        reached = [(b, r["steps_to_target"]) for b, r in points if r["steps_to_target"]]
        right.plot([b for b, _ in reached], [s for _, s in reached], style, label=label)
    base = next((r["steps_to_target"] for r in rows if r["global_batch_size"] == b0 and r["steps_to_target"]), None)
    if base:
        batches = [b0 * k for k in FACTORS]
        right.plot(batches, [base * b0 / b for b in batches], "k--", linewidth=1, label="perfect scaling")
    left.set_xscale("log", base=2)
    left.set_yscale("log")   # SGD's 10-15% and an optimizer near chance on one axis
    left.set(xlabel="global batch (images per optimizer step)", ylabel="test error (%)", title="test error")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set(xlabel="global batch (images per optimizer step)", ylabel="optimizer steps",
              title=f"steps to val acc@1 >= {summary['target_val_acc1']:.3f}")
    for ax in (left, right):
        ax.legend(fontsize=8)
    path.write_bytes(figure_png(fig))


def large_batch(console: Console, preset: Preset, seeds: int | None = None, as_json: bool = False,
                plot_path: str = "large_batch.png") -> dict:
    """Run every row for each seed (seed-major, so a cut-short run still has one full table), print the
    table and write the plot; returns the `--json` summary."""
    from orchestrator.store.storage import strict_json

    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-large-batch-") as storage:
        for seed in range(seeds or preset.seeds):
            for config in configs(preset.b0):
                result = run_one(config, seed, storage, preset)
                results.append(result)
                console.print(f"batch {config.global_batch_size:5d} warmup {config.warmup_epochs:g} {config.optimizer:4s} "
                              f"seed {seed}: {result.optimizer_steps} steps, test acc@1 {result.test_acc1} "
                              f"({result.status}, {result.wall_s:.0f} s)")
    summary = summarize(results, preset.b0)
    plot(summary, preset.b0, Path(plot_path))
    console.print(table(summary, results, preset.b0))
    slope = summary["steps_to_target_slope"]
    console.print(f"steps to target against batch, SGD with warmup: log-log slope "
                  f"{'n/a' if slope is None else f'{slope:.2f}'} (-1 = perfect scaling); "
                  f"{time.perf_counter() - started:.0f} s in all; wrote {plot_path}")
    if as_json:
        print(strict_json(summary))
    return summary
