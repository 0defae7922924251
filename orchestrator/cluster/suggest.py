"""What a sweep runs next, as pure functions of the seed and the results so far (no Ray, no saved state).

- `draw_random`: draws of `sweep.space` with Tune's variant generator (grid kinds expanded), seeded, so draw k
  is the same whether a sweep drew it first or in an `--extend`;
- `grid_values`: every key's values crossed (`sweep.search: grid`);
- `suggest_tpe`: Optuna's TPE sampler told every finished trial, asked for trial `number`; a fresh sampler
  seeded by (seed, number) each time, so a suggestion is a function of (seed, number, history) and a
  resumed sweep, which rebuilds the history from sweep.json and the trials' metrics, suggests what an
  unbroken one would;
- `pbt_pairs` and `perturb`: Population Based Training's exploit (weak trials take a strong one's
  checkpoint) and explore (values scaled by 0.8 or 1.2, or drawn afresh), as Ray Tune's PBT does them,
  seeded by (seed, epoch);
- `pareto_front`: which trials no other trial beats on every objective.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np

from orchestrator.config.catalog import SEARCH_KINDS, same_names

PERTURB_FACTORS = (0.8, 1.2)
"""explore: a numeric value is multiplied by one of these (Tune PBT's defaults)"""


SEARCH_SPACES: dict[str, Callable[[Any, list], Any]] = {
    "loguniform": lambda tune, args: tune.loguniform(*args),
    "uniform": lambda tune, args: tune.uniform(*args),
    "randint": lambda tune, args: tune.randint(*args),
    "choice": lambda tune, args: tune.choice(args),
    "grid": lambda tune, args: tune.grid_search(args),
}
"""sweep.space kinds -> builder(ray.tune, arguments); their names: catalog.SEARCH_KINDS"""
same_names(SEARCH_SPACES, SEARCH_KINDS, "cluster.suggest.SEARCH_SPACES")


def tune_space(space: dict[str, dict]) -> dict[str, Any]:
    """sweep.space as Ray Tune domains."""
    from ray import tune

    out = {}
    for key, domain in space.items():
        (kind, args), = domain.items()
        out[key] = SEARCH_SPACES[kind](tune, args)
    return out


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, *salt])


def draw_random(space: dict[str, dict], seed: int, start: int, count: int) -> list[dict[str, Any]]:
    """Draws start .. start+count-1 of the space (each grid kind expanded, so a draw can be several trials)."""
    from ray.tune.search.variant_generator import generate_variants

    rng = np.random.RandomState(seed)
    draws = [[{k: _plain(v) for k, v in resolved.items()}
              for _, resolved in generate_variants(tune_space(space), random_state=rng)] for _ in range(start + count)]
    return [values for draw in draws[start:] for values in draw]


def _plain(value):
    """A sampled value as plain JSON (numpy scalars become Python numbers)."""
    return value.item() if hasattr(value, "item") else value


def grid_values(space: dict[str, dict]) -> list[dict[str, Any]]:
    """Every combination of the keys' value lists (sweep.search: grid takes only grid and choice kinds)."""
    keys = list(space)
    lists = [next(iter(space[key].values())) for key in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


@dataclass(frozen=True)
class Finished:
    """A trial the searcher is told about: its values, its metric after each epoch, and how it ended."""

    values: dict[str, Any]
    scores: list[float | None]
    """sweep.metric after epoch 1, 2, ... (None where it was not measured)"""
    state: str
    """completed (ran every epoch), stopped (ASHA stopped it), running, error"""


def _distribution(kind: str, args: list):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if kind == "loguniform":
        return FloatDistribution(float(args[0]), float(args[1]), log=True)
    if kind == "uniform":
        return FloatDistribution(float(args[0]), float(args[1]))
    if kind == "randint":
        return IntDistribution(int(args[0]), int(args[1]) - 1)   # Tune's randint excludes the upper bound
    return CategoricalDistribution(list(range(len(args))))       # by index: a value may be a list or a dict


def _to_optuna(space: dict[str, dict], values: dict[str, Any]) -> dict[str, Any] | None:
    """The trial's values as Optuna params (choices as indices); None when a value lies outside the space."""
    params = {}
    for key, domain in space.items():
        (kind, args), = domain.items()
        if key not in values:
            return None
        value = values[key]
        if kind in ("choice", "grid"):
            if value not in args:
                return None
            value = args.index(value)
        elif not (args[0] <= value <= args[1]):
            return None
        params[key] = value
    return params


def _history_trial(space, distributions, trial: Finished, sign: float):
    from optuna.trial import TrialState, create_trial

    params = _to_optuna(space, trial.values)
    if params is None or trial.state == "error":
        return None
    measured = {epoch: score for epoch, score in enumerate(trial.scores, start=1) if score is not None}
    if trial.state == "completed" and measured:
        best = max(sign * s for s in measured.values()) * sign
        return create_trial(params=params, distributions=distributions, value=best, intermediate_values=measured)
    if trial.state == "stopped" and measured:
        return create_trial(params=params, distributions=distributions, state=TrialState.PRUNED,
                            intermediate_values=measured)
    return create_trial(params=params, distributions=distributions, state=TrialState.RUNNING)


def suggest_tpe(space: dict[str, dict], seed: int, number: int, startup_trials: int, mode: str,
                history: list[Finished]) -> dict[str, Any]:
    """Trial `number`'s values: TPE over `history` (completed trials by their best score, ASHA-stopped ones
    as pruned at their last epoch, running ones as running: the constant liar keeps concurrent
    suggestions apart), after `startup_trials` random ones."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {key: _distribution(*next(iter(domain.items()))) for key, domain in space.items()}
    sampler = optuna.samplers.TPESampler(seed=int(np.random.SeedSequence([seed, number]).generate_state(1)[0]),
                                         n_startup_trials=startup_trials, constant_liar=True)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", sampler=sampler)
    sign = 1.0 if mode == "max" else -1.0
    for trial in history:
        made = _history_trial(space, distributions, trial, sign)
        if made is not None:
            study.add_trial(made)
    asked = study.ask(distributions)
    return _from_optuna(space, asked.params)


def _from_optuna(space: dict[str, dict], params: dict[str, Any]) -> dict[str, Any]:
    values = {}
    for key, domain in space.items():
        (kind, args), = domain.items()
        value = params[key]
        values[key] = args[value] if kind in ("choice", "grid") else _plain(value)
    return values


def pbt_pairs(scores: dict[str, float | None], mode: str, quantile_fraction: float, seed: int,
              epoch: int) -> list[tuple[str, str]]:
    """(recipient, donor) pairs of one perturbation: the bottom `quantile_fraction` of the trials by score
    each take a donor drawn from the top as many (Tune's PBT: ceil, at most half). Unscored trials rank last."""
    sign = 1.0 if mode == "max" else -1.0
    ranked = sorted(scores, key=lambda t: (scores[t] is None, -sign * (scores[t] or 0.0), t))
    count = min(math.ceil(len(ranked) * quantile_fraction), len(ranked) // 2)
    if count == 0:
        return []
    top, bottom = ranked[:count], ranked[-count:]
    rng = _rng(seed, epoch, 1)
    return [(recipient, top[int(rng.integers(len(top)))]) for recipient in bottom]


def perturb(values: dict[str, Any], space: dict[str, dict], resample_probability: float, seed: int,
            epoch: int, trial_number: int) -> dict[str, Any]:
    """The donor's values explored for a recipient: each key drawn afresh from its domain with
    `resample_probability`, else a number scaled by 0.8 or 1.2 (kept in its range) or a choice moved to
    a neighbouring value."""
    rng = _rng(seed, epoch, 2, trial_number)
    out = dict(values)
    for key, domain in space.items():
        (kind, args), = domain.items()
        if rng.random() < resample_probability:
            out[key] = _draw(kind, args, rng)
        elif kind in ("choice", "grid"):
            index = args.index(values[key]) if values[key] in args else 0
            out[key] = args[min(len(args) - 1, max(0, index + int(rng.choice([-1, 1]))))]
        else:
            scaled = min(args[1], max(args[0], values[key] * float(rng.choice(PERTURB_FACTORS))))
            out[key] = int(round(scaled)) if kind == "randint" else scaled
    return out


def _draw(kind: str, args: list, rng: np.random.Generator):
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "randint":
        return int(rng.integers(args[0], args[1]))
    return args[int(rng.integers(len(args)))]


def pareto_front(points: list[list[float | None]], modes: list[str]) -> list[bool]:
    """For each point (one value per objective), whether no other point is at least as good on every
    objective and better on one. A point missing a value is not on the front."""
    signs = [1.0 if mode == "max" else -1.0 for mode in modes]
    scored = [None if any(v is None for v in p) else [s * v for s, v in zip(signs, p)] for p in points]

    def beaten(a: list[float]) -> bool:
        return any(b is not None and all(y >= x for x, y in zip(a, b)) and any(y > x for x, y in zip(a, b))
                   for b in scored)

    return [a is not None and not beaten(a) for a in scored]
