"""The `orchestrator` command line: one module per group of commands (`job`, `cluster`, `after`, `data`,
`bench`), what they share (`common`), one table of them (`commands`), the parser and exit codes (`app`).

May import: everything. Every user error exits 2 with one line per problem, never a traceback.
"""


def main(argv: list[str] | None = None) -> int:
    """The command line (the `orchestrator` script); imports the commands when called, so `python -m
    orchestrator.cli` can first check that this Python has what they need (`__main__`)."""
    from orchestrator.cli.app import main as run

    return run(argv)


__all__ = ["main"]
