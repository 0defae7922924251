"""The values that stand for a sweep's search space (`sweep.space`), and the check that each makes a job.

The kinds are named in `catalog.SEARCH_KINDS`, checked with the job (`checks.check_space`) and built
into Ray Tune domains by `cluster.suggest.SEARCH_SPACES`. `validate_space` checks that every probe of
the space (`probe_values`: every choice, both ends of every range) makes a valid job.
"""

from __future__ import annotations

import itertools
from typing import Any

from orchestrator.config.errors import SpecError
from orchestrator.config.jobfile import validate_spec
from orchestrator.config.keys import with_values


def probe_values(space: dict[str, dict]) -> list[dict[str, Any]]:
    """Values that stand for the whole space: every choice and grid value, and the ends of each range."""
    per_key = []
    for key, domain in space.items():
        (kind, args), = domain.items()
        per_key.append([(key, v) for v in args])
    return [dict(pairs) for pairs in itertools.product(*per_key)][:256]


def validate_space(raw: dict) -> None:
    """Every probe of the space must make a valid job; SpecError lists what does not."""
    problems = []
    for values in probe_values(raw.get("sweep", {}).get("space", {})):
        try:
            validate_spec(with_values(raw, values))
        except SpecError as exc:
            problems += [f"sweep.space with {', '.join(f'{k}={v}' for k, v in values.items())}: {p}" for p in exc.problems]
    if problems:
        raise SpecError(sorted(set(problems)))
