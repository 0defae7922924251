"""The commands after training: runs, report, export, evaluate, predict."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import console, err_console, write_local, write_outputs
from orchestrator.config.catalog import EXPORT_FORMATS


def cmd_runs(args) -> int:
    from orchestrator.store.runs import list_runs
    from orchestrator.store.storage import strict_json

    found = list_runs(args.storage)
    if args.json:
        print(strict_json([r.to_json() for r in found]))
        return 0
    if not found:
        console.print(f"no runs in {args.storage}")
        return 0
    from orchestrator.train.progress import print_listing

    print_listing(console, runs_table(found, args.storage), ("name",))
    return 0

def runs_table(found, storage: str) -> Table:
    table = Table(title=f"runs in {storage}", title_justify="left")
    for column in ("name", "status", "epochs", "best val acc@1", "test acc@1", "wall", "updated"):
        table.add_column(column, justify="right" if column in ("epochs", "best val acc@1", "test acc@1", "wall") else "left",
                         no_wrap=column in ("status", "wall", "updated"), overflow="fold")
    colour = {"running": "cyan", "completed": "green", "failed": "red", "diverged": "red", "interrupted": "yellow"}

    def number(value, digits=4):
        return "-" if value is None else f"{value:.{digits}f}"

    for r in found:
        if r.kind == "sweep":
            name = f"{r.name} (sweep: {r.trials} trials)"
            best = f"best {r.best_trial}: {r.best_metric} {number(r.best)}" if r.best_trial else "-"
            epochs, val = f"{r.epochs_completed} run", best
        else:
            name, epochs, val = r.name, f"{r.epochs_completed}/{r.epochs or '?'}", number(r.best_val_acc1)
        updated = _local_time(r.updated_at)
        table.add_row(escape(name), f"[{colour.get(r.status, 'white')}]{r.status}[/]", epochs, val,
                      number(r.test_acc1), "-" if r.wall_s is None else f"{r.wall_s:.0f} s", updated)
    return table

def _local_time(iso: str | None) -> str:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M") if iso else "-"

def cmd_report(args) -> int:
    from orchestrator.after.report import run_report, sweep_report
    from orchestrator.after.trained import TrainedError, open_run_folder
    from orchestrator.store.runs import folder_kind
    from orchestrator.store.storage import REPORT_DIR

    folders = [open_run_folder(run) for run in args.run]
    for folder in folders:
        if folder_kind(folder) is None:
            raise TrainedError(f"{folder.uri} is neither a run folder (spec.yaml) nor a sweep folder (sweep.json)")
    if len(folders) > 1:
        from orchestrator.after.compare import compare_report

        if not args.out:
            raise TrainedError("report: several runs go into one page: give --out DIR")
        files = compare_report(folders)
    else:
        folder = folders[0]
        files = sweep_report(folder) if folder_kind(folder) == "sweep" else run_report(folder)
    where = write_outputs(folders[0], REPORT_DIR, args.out, files)
    console.print(f"wrote {where}/index.html and {len(files) - 1} PNG plot(s): "
                  + ", ".join(sorted(n for n in files if n.endswith(".png"))))
    return 0

def cmd_export(args) -> int:
    from pathlib import Path

    from orchestrator.after.export import default_name, export_run
    from orchestrator.after.trained import TrainedError, load_trained
    from orchestrator.store.storage import EXPORT_DIR

    trained = load_trained(args.run)
    if trained.spec is None:
        raise TrainedError(f"{args.run} is an exported file: export reads a run folder")
    console.print(f"exporting {trained.where} ({trained.spec.model.arch}, {len(trained.class_names)} classes) as {args.format}")
    result = export_run(trained, args.format, args.fold_bn)
    if args.fold_bn:
        console.print(f"folded {result.folded_pairs} conv+BN pairs; max abs logit difference folded vs unfolded on "
                      f"{result.check_count} {result.check_split} images: {result.fold_diff:.2e}")
        table = Table(title="CPU inference, this machine (median ms per batch)", title_justify="left")
        for column in ("batch", "unfolded ms", "folded ms", "speedup"):
            table.add_column(column, justify="right")
        for row in result.speed:
            table.add_row(str(row.batch), f"{row.unfolded_ms:.2f}", f"{row.folded_ms:.2f}", f"{row.speedup:.2f}x")
        console.print(table)
    if result.onnx_diff is not None:
        console.print(f"onnxruntime checked: max abs logit difference ONNX vs torch {result.onnx_diff:.2e}")
    elif args.format == "onnx":
        console.print("[yellow]note:[/yellow] onnxruntime is not installed: the ONNX file was not run "
                      "(pip install 'orchestrator[export]')")
    name = default_name(trained, args.format, args.fold_bn)
    if args.out:
        target = Path(args.out) / name if Path(args.out).is_dir() else Path(args.out)
        write_local(target, result.data)
        where = str(target.resolve())
    else:
        trained.folder.write_bytes(f"{EXPORT_DIR}/{name}", result.data)
        where = f"{trained.folder.uri}/{EXPORT_DIR}/{name}"
    console.print(f"wrote {where} ({len(result.data) / 1e6:.1f} MB)")
    return 0

def cmd_evaluate(args) -> int:
    from orchestrator.after.evaluation import confusion_png, evaluate_split
    from orchestrator.after.trained import load_trained
    from orchestrator.store.storage import REPORT_DIR, strict_json

    trained = load_trained(args.run)
    result = evaluate_split(trained, args.data, args.split)   # an exported file: exit 2, it has no data to read
    png = confusion_png(result, trained.class_names, f"{trained.spec.name}: {result.split} split of {result.source}")
    where = write_outputs(trained.folder, REPORT_DIR, args.out, {f"confusion_{result.split}.png": png})
    if args.json:
        print(strict_json(result.to_json()))
        err_console.print(f"wrote {where}/confusion_{result.split}.png")
        return 0
    balanced, f1 = result.balanced_and_f1
    console.print(f"{trained.where} on the {result.split} split of {result.source}: acc@1 {result.acc1:.4f}, "
                  f"acc@5 {result.acc5:.4f}, balanced acc {balanced:.4f}, macro F1 {f1:.4f} ({result.images} images)")
    table = Table(title="per class", title_justify="left")
    for column in ("class", "images", "acc@1"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for i, (name, acc) in enumerate(result.per_class.items()):
        table.add_row(escape(name), str(int(result.confusion[i].sum())), "-" if acc is None else f"{acc:.4f}")
    console.print(table)
    console.print(f"wrote {where}/confusion_{result.split}.png")
    return 0

def cmd_predict(args) -> int:
    from orchestrator.after.evaluation import predict_files
    from orchestrator.after.trained import load_trained
    from orchestrator.store.storage import strict_json

    trained = load_trained(args.run)
    predictions = predict_files(trained, args.images, args.top_k)
    if args.json:
        print(strict_json([p.to_json() for p in predictions]))
        return 0
    table = Table(title=f"predictions of {trained.where}", title_justify="left")
    table.add_column("image")
    table.add_column(f"top {min(args.top_k, len(trained.class_names))} (probability)")
    for p in predictions:
        table.add_row(escape(p.image), ", ".join(f"{escape(c)} {prob:.3f}" for c, prob in p.top))
    from orchestrator.train.progress import print_listing

    print_listing(console, table, ("image",))
    return 0


def add_runs(p: argparse.ArgumentParser) -> None:
    """one row per run and sweep folder in a storage: status, epochs, accuracy, time"""
    p.add_argument("storage", nargs="?", default="./runs", help="run.storage to list (path or URI; default ./runs)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def add_report(p: argparse.ArgumentParser) -> None:
    """PNG plots and one self-contained HTML page of a run or a sweep, or of several runs side by side"""
    p.add_argument("run", metavar="RUN_OR_SWEEP", nargs="+",
                   help="run or sweep folder (path or URI); several: their curves on shared axes (a sweep: its trials)")
    p.add_argument("--out", help="local folder to write to (default: the run folder's report/; several runs: required)")


def add_export(p: argparse.ArgumentParser) -> None:
    """the run's best weights as ONNX, a torch.export program or safetensors"""
    p.add_argument("run", help="run folder (path or URI)")
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default="onnx", help="file format (default onnx)")
    p.add_argument("--fold-bn", action="store_true", help="fold every conv+BatchNorm pair, check it on the run's images, time it")
    p.add_argument("--out", help="file to write (default: the run folder's export/NAME[_folded].FORMAT)")


def add_evaluate(p: argparse.ArgumentParser) -> None:
    """acc@1/@5, per-class accuracy and a confusion matrix of a run's model on a split"""
    p.add_argument("run", help="run folder (path or URI)")
    p.add_argument("--data", metavar="SOURCE", help="another data.source with the run's classes (default: the run's data)")
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.add_argument("--json", action="store_true", help='print {"acc1", "acc5", "balanced_acc", "macro_f1", "per_class", "images"}')
    p.add_argument("--out", help="local folder for the confusion matrix PNG (default: the run folder's report/)")


def add_predict(p: argparse.ArgumentParser) -> None:
    """classify image files with a run's model (or an exported .safetensors/.onnx)"""
    p.add_argument("run", help="run folder, or a file written by orchestrator export")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help='print [{"image", "top": [{"class", "prob"}]}]')
