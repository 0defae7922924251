"""The search space of a sweep (`sweep.space`): its kinds, their checks, and the values that stand for it.

`SEARCH_SPACES` is the registry of kinds (loguniform, uniform, randint, choice, grid), each a
builder of a Ray Tune domain given the `ray.tune` module (sweep.py passes it: no Ray imported here).
`check_space` is the spec's validation of the section; `validate_space` checks that every probe of
the space (`probe_values`) makes a valid job.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from orchestrator.spec import MISSING, JobSpec, SpecError, did_you_mean, leaf_keys, lookup, validate_spec, with_values

SEARCH_SPACES: dict[str, Callable[[Any, list], Any]] = {
    "loguniform": lambda tune, args: tune.loguniform(*args),
    "uniform": lambda tune, args: tune.uniform(*args),
    "randint": lambda tune, args: tune.randint(*args),
    "choice": lambda tune, args: tune.choice(args),
    "grid": lambda tune, args: tune.grid_search(args),
}
"""sweep.space kinds -> builder(ray.tune, arguments); the spec's validation reads this"""


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


def check_space(space: dict[str, dict[str, Any]]) -> list[str]:
    """One line per problem of sweep.space: keys that are not job keys, unknown kinds, bad arguments."""
    search_kinds = list(SEARCH_SPACES)
    problems = []
    defaults = JobSpec().to_dict()
    for key, domain in space.items():
        where = f"sweep.space.{key}"
        if lookup(defaults, key) is MISSING:
            problems.append(f"{where}: not a job-file key{did_you_mean(key, leaf_keys(defaults))}")
        if not isinstance(domain, dict) or len(domain) != 1:
            problems.append(f"{where}: give exactly one of {', '.join(search_kinds)}")
            continue
        (kind, args), = domain.items()
        if kind not in search_kinds:
            problems.append(f"{where}: unknown search kind {kind!r}{did_you_mean(kind, search_kinds)}; valid: {', '.join(search_kinds)}")
        elif kind in ("loguniform", "uniform", "randint"):
            if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args) and args[0] < args[1]):
                problems.append(f"{where}.{kind}: needs [low, high] with low < high (got {args!r})")
            elif kind == "loguniform" and args[0] <= 0:
                problems.append(f"{where}.loguniform: bounds must be > 0 (got {args!r})")
        elif not (isinstance(args, list) and args):
            problems.append(f"{where}.{kind}: needs a non-empty list of values (got {args!r})")
    return problems
