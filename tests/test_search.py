"""Issue 26: what a sweep runs next (TPE, random draws, grids, PBT's exploit and explore) and the Pareto
front, as pure functions; the job-file checks of sweep.search, sweep.scheduler and sweep.objectives."""

import math

import pytest
from conftest import tiny_job

from orchestrator.cluster.suggest import Finished, draw_random, grid_values, pareto_front, pbt_pairs, perturb, suggest_tpe
from orchestrator.config.errors import SpecError
from orchestrator.config.jobfile import validate_spec

SPACE = {"optim.base_lr": {"loguniform": [1e-4, 1.0]}, "optim.name": {"choice": ["sgd", "adamw"]}}


def _score(values: dict) -> float:
    """A known landscape: best at lr 1e-2 with sgd."""
    return 1.0 - (math.log10(values["optim.base_lr"]) + 2) ** 2 / 16 - (0.2 if values["optim.name"] == "adamw" else 0)


def _tpe_run(seed: int, count: int) -> list[dict]:
    history: list[Finished] = []
    for number in range(count):
        values = suggest_tpe(SPACE, seed, number, 4, "max", history)
        history.append(Finished(values, [_score(values)], "completed"))
    return [h.values for h in history]


def test_tpe_is_a_function_of_seed_number_and_history():
    first, again = _tpe_run(3, 8), _tpe_run(3, 8)
    assert first == again                                    # a resumed sweep rebuilds the same suggestions
    assert _tpe_run(4, 8) != first
    assert all(1e-4 <= v["optim.base_lr"] <= 1.0 and v["optim.name"] in ("sgd", "adamw") for v in first)


def test_tpe_moves_towards_the_good_region():
    late = [v for seed in range(3) for v in _tpe_run(seed, 24)[12:]]
    early = [v for seed in range(3) for v in _tpe_run(seed, 24)[:4]]    # the random startup trials
    assert sum(map(_score, late)) / len(late) > sum(map(_score, early)) / len(early) + 0.1


def test_tpe_takes_stopped_running_and_failed_trials():
    history = [Finished({"optim.base_lr": 0.01, "optim.name": "sgd"}, [0.5, 0.6], "completed"),
               Finished({"optim.base_lr": 0.5, "optim.name": "sgd"}, [0.1], "stopped"),
               Finished({"optim.base_lr": 0.001, "optim.name": "adamw"}, [], "running"),
               Finished({"optim.base_lr": 0.002, "optim.name": "adamw"}, [], "error"),
               Finished({"optim.base_lr": 7.0, "optim.name": "sgd"}, [0.9], "completed")]   # outside the space: left out
    values = suggest_tpe(SPACE, 0, 5, 1, "max", history)
    assert set(values) == set(SPACE)


def test_random_draws_extend_the_same_sequence():
    space = {"optim.base_lr": {"loguniform": [1e-4, 1e-1]}, "optim.name": {"grid": ["sgd", "adamw"]}}
    assert draw_random(space, 0, 0, 3) + draw_random(space, 0, 3, 2) == draw_random(space, 0, 0, 5)
    assert len(draw_random(space, 0, 0, 3)) == 6                          # each draw expands the grid


def test_grid_crosses_every_list():
    grid = grid_values({"optim.base_lr": {"grid": [0.1, 0.01]}, "optim.name": {"choice": ["sgd", "adamw", "adam"]}})
    assert len(grid) == 6 and {"optim.base_lr": 0.01, "optim.name": "adam"} in grid


def test_pbt_bottom_takes_from_top_and_perturbs_within_the_space():
    scores = {"t0": 0.9, "t1": 0.1, "t2": None, "t3": 0.5, "t4": 0.7, "t5": 0.8, "t6": 0.2, "t7": 0.3}
    pairs = pbt_pairs(scores, "max", 0.25, seed=0, epoch=1)
    assert {r for r, _ in pairs} == {"t2", "t1"} and all(d in ("t0", "t5") for _, d in pairs)
    assert pairs == pbt_pairs(scores, "max", 0.25, seed=0, epoch=1)       # seeded by (seed, epoch)
    assert {r for r, _ in pbt_pairs(scores, "min", 0.25, 0, 1)} == {"t2", "t0"}
    assert pbt_pairs({"t0": 0.5}, "max", 0.25, 0, 1) == []
    space = {"optim.base_lr": {"loguniform": [1e-3, 1e-1]}, "optim.momentum": {"choice": [0.8, 0.9, 0.95]}}
    values = {"optim.base_lr": 0.05, "optim.momentum": 0.9}
    seen = [perturb(values, space, 0.0, 0, 1, n) for n in range(20)]
    assert {round(v["optim.base_lr"] / 0.05, 6) for v in seen} == {0.8, 1.2}
    assert {v["optim.momentum"] for v in seen} == {0.8, 0.95}            # a neighbouring choice
    assert all(1e-3 <= perturb(values, space, 1.0, 0, 1, n)["optim.base_lr"] <= 1e-1 for n in range(20))
    top = {"optim.base_lr": 0.1, "optim.momentum": 0.95}
    assert all(v["optim.base_lr"] <= 0.1 for v in (perturb(top, space, 0.0, 0, 2, n) for n in range(10)))


def test_pareto_front():
    points = [[0.9, 10.0], [0.8, 5.0], [0.85, 12.0], [0.7, 5.0], [None, 1.0], [0.9, 10.0]]
    assert pareto_front(points, ["max", "min"]) == [True, True, False, False, False, True]


def _sweep_job(**sweep) -> dict:
    job = tiny_job("/tmp/runs", "s", schedule={"epochs": 3, "warmup_epochs": 0})
    job["sweep"] = {"space": {"optim.base_lr": {"loguniform": [1e-3, 1e-1]}}, **sweep}
    return job


@pytest.mark.parametrize("sweep, message", [
    ({"search": "grid"}, "sweep.space.optim.base_lr: search grid crosses lists of values; loguniform is a range"),
    ({"search": "bayes"}, "sweep.search: unknown search 'bayes'"),
    ({"scheduler": "pbt", "space": {"model.arch": {"choice": ["resnet18", "resnet34"]}}},
     "sweep.space.model.arch: PBT changes values while a trial trains, and model.arch cannot change then"),
    ({"scheduler": "pbt", "search": "tpe"}, "sweep.search: tpe suggests whole trials"),
    ({"scheduler": "pbt", "pbt": {"perturbation_interval": 3}}, "sweep.pbt.perturbation_interval: 3 epochs leaves no perturbation"),
    ({"objectives": [{"metric": "latency_ms", "mode": "min"}]}, "sweep.objectives: the first is what ASHA and PBT act on"),
    ({"objectives": [{"metric": "val_acc1"}, {"metric": "flops", "mode": "min"}]}, "unknown objective 'flops'"),
    ({"metric": "val_loss", "mode": "min", "objectives": [{"metric": "val_acc1"}]}, "sweep.metric val_loss (min) differs"),
])
def test_bad_search_settings_name_the_key(sweep, message):
    with pytest.raises(SpecError) as info:
        validate_spec(_sweep_job(**sweep))
    assert any(message in p for p in info.value.problems), info.value.problems


def test_objectives_set_the_metric():
    spec = validate_spec(_sweep_job(objectives=[{"metric": "val_loss", "mode": "min"}, {"metric": "params", "mode": "min"}]))
    assert (spec.sweep.metric, spec.sweep.mode) == ("val_loss", "min")
    assert validate_spec(spec.to_dict()).sweep.objectives == spec.sweep.objectives    # its own job file reloads
