"""The data command: pack an image folder tree into Parquet shards."""

from __future__ import annotations

import argparse

from rich.markup import escape

from orchestrator.cli.common import console, err_console


def cmd_pack(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from orchestrator.data.pack import PackError, check_out, pack
    from orchestrator.store.storage import strict_json

    if args.shard_size_mb <= 0 or (args.max_side is not None and args.max_side < 8) or (args.workers is not None and args.workers < 1):
        raise PackError("--shard-size-mb must be > 0, --max-side >= 8, --workers >= 1")
    if not 0 <= args.val_fraction < 1:
        raise PackError(f"--val-fraction: {args.val_fraction}; give a share in [0, 1)")
    check_out(args.out)
    show = err_console if args.json else console
    reused = []
    with Progress(TextColumn("packing"), BarColumn(), MofNCompleteColumn(), TextColumn("images"), TimeRemainingColumn(),
                  console=show, transient=True) as bar:
        task = bar.add_task("", total=None)

        def on_shard(entry: dict, total: int) -> None:
            bar.update(task, total=total, advance=entry["rows"] + len(entry["skipped"]))
            if entry["reused"]:
                reused.append(entry["file"])

        manifest = pack(args.src, args.out, args.shard_size_mb, args.max_side, args.workers, on_shard,
                        val_fraction=args.val_fraction)
    for item in manifest["skipped"][:20]:
        show.print(f"[yellow]skipped[/yellow] {escape(item['path'])}: {escape(item['error'])}")
    if len(manifest["skipped"]) > 20:
        show.print(f"... and {len(manifest['skipped']) - 20} more unreadable images (all listed in the manifest)")
    shards = sum(len(entry["shards"]) for entry in manifest["splits"].values())
    show.print(f"packed {escape(args.src)} into {shards} shard(s) in {escape(args.out)} ("
               + ", ".join(f"{name} {entry['images']}" for name, entry in manifest["splits"].items())
               + f" images, {len(manifest['class_names'])} classes; {len(manifest['skipped'])} unreadable skipped"
               + (f"; {len(reused)} shard(s) already packed, kept" if reused else "") + ")")
    show.print(f"train on it: --set data.source=shards:{escape(args.out)}")
    if args.json:
        print(strict_json({"shards": shards, "splits": {k: v["images"] for k, v in manifest["splits"].items()},
                           "classes": len(manifest["class_names"]), "skipped": len(manifest["skipped"]), "reused": len(reused)}))
    return 0


def add_pack(p: argparse.ArgumentParser) -> None:
    """pack an ImageFolder tree into Parquet shards + manifest.json (data.source: shards:OUT)"""
    p.add_argument("src", help="folder with train/ (val/, test/) of class folders, or the class folders themselves")
    p.add_argument("out", help="folder or URI (s3://, gs://, file://) to write the shards and manifest to")
    p.add_argument("--shard-size-mb", type=float, default=256, help="about this many MB of images per shard (default 256)")
    p.add_argument("--max-side", type=int, default=None, help="re-encode images whose longer side exceeds PX (JPEG); default: keep bytes")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="SRC of class folders (no train/): pack this stratified share of each class as val (default 0.2)")
    p.add_argument("--workers", type=int, default=None, help="processes packing shards (default: all cores)")
    p.add_argument("--json", action="store_true", help='print {"shards", "splits", "classes", "skipped", "reused"}')
