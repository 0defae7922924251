"""The `orchestrator` command line: one module per group of commands (`job`, `cluster`, `after`, `data`,
`bench`), what they share (`common`), one table of them (`commands`), the parser and exit codes (`main`).

May import: everything. Every user error exits 2 with one line per problem, never a traceback.
"""

from orchestrator.cli.main import main

__all__ = ["main"]
