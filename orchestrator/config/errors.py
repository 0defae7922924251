"""The errors a user caused, as torch-free base classes, and how a wrong name is said.

Every error that is the user's to fix (the job file, the data, the weights, a run folder, a cluster
address) derives from `UserError`: the command line prints its lines and exits 2, and classifies an
exception without importing the module that raised it (torch and torchvision take ~3 s to import).
`JobError` marks the errors of the job itself (its data, weights, model, checkpoints, plan): a retry
gives the same error, so Ray's failure policy raises them at once instead of restarting workers.
`Interrupted` is a run or sweep that Ctrl-C or SIGTERM stopped (exit 130 or 143).
Imports nothing of orchestrator.
"""

from __future__ import annotations

import difflib
import re


class UserError(Exception):
    """Something the user can fix; `problems` holds one line per problem (exit 2)."""

    @property
    def problems(self) -> list[str]:
        return str(self).splitlines() or [type(self).__name__]


class JobError(UserError):
    """An error of the job, its data or its weights: the same on every retry, so a run stops at once."""


class Interrupted(Exception):
    """A run or sweep stopped by Ctrl-C or SIGTERM; the message says what was kept."""


class SpecError(UserError):
    """A job file that cannot run. `problems` holds one human line per problem, each naming the key."""

    def __init__(self, problems: list[str]):
        self._problems = list(problems)
        super().__init__("\n".join(problems))

    @property
    def problems(self) -> list[str]:
        return self._problems

    def __reduce__(self):   # pickled (a Ray worker's error) with its lines, not the joined message
        return type(self), (self._problems,)


def did_you_mean(word: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_of(value: str, names, what: str = "value") -> str:
    """`value` when it is one of `names`, else ValueError listing them (with a "did you mean")."""
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}{did_you_mean(value, names)}; valid: {', '.join(names)}")
    return value


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain_text(text: str) -> str:
    """A library's message fit to be part of ours: its terminal colour and style escapes removed."""
    return ANSI_ESCAPE.sub("", text)
