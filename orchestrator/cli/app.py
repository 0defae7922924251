"""`orchestrator COMMAND`: the parser built from the table of commands, and how each outcome becomes an exit code.

Exit codes: 0 done; 2 a user error (`config.errors.UserError`: one line per problem, never a
traceback); 1 a run that failed or diverged, a storage error, a worker's error on Ray; 130 Ctrl-C,
143 SIGTERM. An exception is classified by its torch-free base class, so no error imports torch.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from rich.markup import escape

from orchestrator.cli import common
from orchestrator.cli.commands import COMMANDS
from orchestrator.cli.common import err_console, interrupted_exit, raise_terminated, report_user_error
from orchestrator.config.errors import Interrupted, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description="Fine-tune torchvision image classifiers with Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_options(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()
    common.received_sigterm.clear()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if on_main_thread else None
    try:
        return args.func(args)
    except UserError as exc:
        return report_user_error(exc)
    except Interrupted as exc:
        err_console.print(str(exc), markup=False)
        return interrupted_exit(exc)
    except KeyboardInterrupt as exc:
        err_console.print("terminated (SIGTERM)" if interrupted_exit(exc) == 143 else "interrupted")
        return interrupted_exit(exc)
    except Exception as exc:
        return _unexpected(exc)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _unexpected(exc: Exception) -> int:
    """A storage error (one line) or a worker's error on Ray (shown whole): exit 1; anything else is a bug: raised."""
    from orchestrator.store.storage import StorageError

    if isinstance(exc, StorageError):
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 1
    if not type(exc).__module__.startswith("ray."):
        raise exc
    # a worker's error: Ray's message carries the worker's traceback; show it whole
    err_console.print(f"[red]error:[/red] training failed on Ray ({type(exc).__name__}):", markup=True)
    err_console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
