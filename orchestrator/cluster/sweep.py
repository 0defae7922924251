"""`orchestrator sweep`: ASHA over any job-file keys with Ray Tune; a one-worker trial runs the loop in its
own Tune actor, a multi-worker trial is a TorchTrainer run.

The sweep samples its trials itself (seeded by the job's `seed`, Tune's own variant generator over
the `sweep.space`) and records them in `sweep.json`: trial id, swept values, and its end as Tune
reports it (`ended`: completed or stopped by ASHA; `error`). Tune then runs them as one grid over
those records: a Tune function trainable (`run_trial`) applies a trial's values to the job,
re-plans it (a swept batch size moves the scaled LR), and either runs `fit` itself (one worker: no
worker group to start; the trial holds the worker's CPUs, and its actor takes the next trial) or
fits a `TorchTrainer` whose `TuneReportCallback` hands every epoch's metrics to Tune; ASHA (`AsyncHyperBandScheduler`,
time unit: epochs, max_t = schedule.epochs) stops the weak ones. Each trial's run folder is
`<sweep folder>/trials/<trial_id>/`; the sweep folder gets `results.parquet` and `best.yaml`.

`--resume` reads only JSON, YAML and weights-only checkpoints: trials that ended are kept, the
rest run again (resuming from their own checkpoints), under a new ASHA that first learns the
kept trials' epoch results. Tune's own saved state (`tune/`, which holds pickles) is never read:
a file planted in shared storage cannot run code here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live

from orchestrator.config.catalog import SEARCH_KINDS, same_names
from orchestrator.config.errors import Interrupted
from orchestrator.config.jobfile import validate_spec
from orchestrator.config.keys import with_values
from orchestrator.config.spec import JobSpec
from orchestrator.train.tracking import open_sweep_tracking
from orchestrator.store.runs import trial_folder, trial_status
from orchestrator.cluster.leaderboard import finish_sweep, leaderboard, leaderboard_rows
from orchestrator.store.storage import METRICS_FILE, SWEEP_BEST_FILE, SWEEP_RESULTS_FILE, SWEEP_STATE_FILE, RunFolder, trials_storage

TUNE_DIR = "tune"
STATE_VERSION = 1
TRIAL_DRIVER_MEMORY_BYTES = 256 * 2**20
TIME_ATTR = "epochs_done"   # reported with every epoch; unlike Tune's iteration count it survives resumes


SEARCH_SPACES: dict[str, Callable[[Any, list], Any]] = {
    "loguniform": lambda tune, args: tune.loguniform(*args),
    "uniform": lambda tune, args: tune.uniform(*args),
    "randint": lambda tune, args: tune.randint(*args),
    "choice": lambda tune, args: tune.choice(args),
    "grid": lambda tune, args: tune.grid_search(args),
}
"""sweep.space kinds -> builder(ray.tune, arguments); their names: catalog.SEARCH_KINDS"""
same_names(SEARCH_SPACES, SEARCH_KINDS, "cluster.sweep.SEARCH_SPACES")


class SweepInterrupted(Interrupted):
    """Ctrl-C during a sweep; the message says how to continue."""


def tune_space(space: dict[str, dict]) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, domain in space.items():
        (kind, args), = domain.items()
        out[key] = SEARCH_SPACES[kind](tune, args)
    return out


def sample_trials(spec: JobSpec) -> list[dict]:
    """The sweep's trials: `num_samples` draws of the space (each grid expanded), seeded by the job's seed."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    rng = np.random.RandomState(spec.seed)
    values = [resolved for _ in range(spec.sweep.num_samples)
              for _, resolved in generate_variants(tune_space(spec.sweep.space), random_state=rng)]
    return [{"id": f"trial_{i:04d}", "values": {k: _plain(v) for k, v in v_.items()}, "status": "pending"}
            for i, v_ in enumerate(values)]


def _plain(value):
    """A sampled value as plain JSON (numpy scalars become Python numbers)."""
    return value.item() if hasattr(value, "item") else value


def read_state(sweep: RunFolder) -> dict | None:
    """The sweep's own record (sweep.json), or None when there is none."""
    if not sweep.exists(SWEEP_STATE_FILE):
        return None
    state = sweep.read_json(SWEEP_STATE_FILE)
    if state.get("version") != STATE_VERSION:
        raise RuntimeError(f"{sweep.uri}/{SWEEP_STATE_FILE} has version {state.get('version')}, this tool reads {STATE_VERSION}")
    return state


def trial_spec(base: dict, values: dict[str, Any], sweep_uri: str, trial_id: str) -> JobSpec:
    raw = with_values(base, values)
    raw["name"] = trial_id
    raw.setdefault("run", {})["storage"] = trials_storage(sweep_uri)
    return validate_spec(raw)


def run_trial(config: dict, base: dict, sweep_uri: str) -> None:
    """The Tune function trainable: one trial's job, planned and fitted. One worker: the loop runs right
    here, in the trial's process (`fit_in_trial`); more: a TorchTrainer whose TuneReportCallback reports."""
    import ray.tune

    from orchestrator.train.resolve import resolve_plan

    trial = config["trial"]
    spec = trial_spec(base, trial["values"], sweep_uri, trial["id"])
    folder = RunFolder(spec.run.storage, spec.name)
    if trial_status(folder, spec.schedule.epochs, None) == "completed":
        # finished before an interruption that the sweep's record missed: hand Tune the record, keep the run
        rows = folder.read_rows(METRICS_FILE)
        ray.tune.report({**rows[-1], TIME_ATTR: len(rows)})
        return
    plan = resolve_plan(spec, spec.scaling.num_workers).plan
    if plan.world_size == 1:
        fit_in_trial(spec, plan)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.cluster.launch import build_trainer

    build_trainer(spec, plan, callbacks=[TuneReportCallback()]).fit()


def fit_in_trial(spec: JobSpec, plan) -> None:
    """A one-worker trial: `fit` in this Tune trial's process, as `train --local` runs it (checkpoints into
    the trial's run folder, resume from its latest), each epoch's row reported to Tune. No worker group
    to start: the trial holds the worker's CPUs (and GPU) itself (`trial_resources`)."""
    import ray.tune
    import torch

    from orchestrator.cluster.launch import local_env
    from orchestrator.train.fit import fit

    torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    env = local_env(spec, emit=lambda event: None)
    last: list[dict] = []

    def report(row: dict) -> None:
        # Tune ends this thread inside report() when it stops the trial (ASHA, or max_t at the last epoch),
        # so each epoch is reported once all of it is written, and the last one after the test evaluation
        # and summary.
        metrics = {**row, TIME_ATTR: row["epoch"] + 1}
        if metrics[TIME_ATTR] < plan.epochs:
            ray.tune.report(metrics)
        else:
            last.append(metrics)

    env.on_epoch_end = report
    fit(spec, plan, env)
    if last:
        ray.tune.report(last[-1])


def trial_resources(base: dict, sweep_uri: str):
    """Tune's resource request per trial: a one-worker trial holds its worker's CPUs (and GPU); a trial
    that drives a TorchTrainer needs no CPU (its workers hold those), a little memory (Tune wants a
    non-empty request)."""
    from ray.tune import PlacementGroupFactory

    def request(config: dict) -> PlacementGroupFactory:
        trial = config["trial"]
        scaling = trial_spec(base, trial["values"], sweep_uri, trial["id"]).scaling
        if scaling.num_workers == 1:
            bundle = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}
        else:
            bundle = {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY_BYTES}
        return PlacementGroupFactory([bundle])
    return request


def default_concurrency(spec: JobSpec) -> int:
    """Trials that fit the cluster at once, from its CPUs (or GPUs) and each trial's workers."""
    import ray

    total = ray.cluster_resources()
    if spec.scaling.use_gpu:
        return max(1, int(total.get("GPU", 0) // spec.scaling.num_workers))
    return max(1, int(total.get("CPU", 1) // (spec.scaling.num_workers * spec.scaling.cpus_per_worker)))


def _status_recorder(sweep: RunFolder, state: dict, interrupted: Interruption):
    """A Tune callback (on the driver) that writes each trial's end into sweep.json as Tune reports it;
    after an interruption, trials that Tune stops stay unfinished (a resume runs them on)."""
    from ray.tune import Callback

    by_id = {trial["id"]: trial for trial in state["trials"]}

    class RecordEnds(Callback):   # called on Tune's controller thread, one call at a time
        def _record(self, trial, status: str) -> None:
            if interrupted.is_set():
                return
            by_id[trial.config["trial"]["id"]]["status"] = status
            sweep.write_json(SWEEP_STATE_FILE, state)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._record(trial, "ended")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._record(trial, "error")

    return RecordEnds()


def make_scheduler(spec: JobSpec, sweep: RunFolder, kept: list[dict]):
    """ASHA over epochs, told the epoch results of the trials a resumed sweep keeps, so the trials that
    run again meet the same rungs an unbroken sweep would have (this reads ASHA's private bracket)."""
    from types import SimpleNamespace

    from ray.tune.schedulers import AsyncHyperBandScheduler

    cfg = spec.sweep
    scheduler = AsyncHyperBandScheduler(time_attr=TIME_ATTR, metric=cfg.metric, mode=cfg.mode, max_t=spec.schedule.epochs,
                                        grace_period=cfg.asha.grace_period, reduction_factor=cfg.asha.reduction_factor)
    sign = 1.0 if cfg.mode == "max" else -1.0
    for trial in kept:
        folder = trial_folder(sweep, trial["id"])
        rows = folder.read_rows(METRICS_FILE) if folder.exists(METRICS_FILE) else []
        for epochs_done, row in enumerate(rows, start=1):
            if row.get(cfg.metric) is not None:
                scheduler._brackets[0].on_result(SimpleNamespace(trial_id=trial["id"]), epochs_done, sign * row[cfg.metric])
    return scheduler


class Interruption:
    """A flag set at Ctrl-C, read by Tune's stopper and callback. It pickles as a fresh, unset flag
    (Tune writes its run config, stopper and callbacks included, to tuner.pkl; that file is never read back)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._event = threading.Event()


def _stop_all_when(interrupted: Interruption):
    """A Tune stopper that ends every trial once `interrupted` is set (Tune's own Ctrl-C handling
    works only when fit() runs on the main thread, and ours runs in a thread)."""
    from ray.tune import Stopper

    class StopAllWhenInterrupted(Stopper):
        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return interrupted.is_set()

    return StopAllWhenInterrupted()


def make_tuner(spec: JobSpec, sweep: RunFolder, state: dict, to_run: list[dict], interrupted: Interruption):
    """A new Tuner over the trials to run (a grid over their records); Tune's state goes to `tune/`, never
    read back. Setting `interrupted` stops every trial and ends fit()."""
    import ray.tune

    running = {t["id"] for t in to_run}
    kept = [t for t in state["trials"] if t["id"] not in running]
    base = spec.to_dict()
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, base=base, sweep_uri=sweep.uri),
                                        trial_resources(base, sweep.uri))
    # One-worker trials run in their Tune actor: a finished or stopped trial's actor (imports done, data cached)
    # takes the next trial. A trial driving a TorchTrainer gets a fresh actor.
    in_trial = all(trial_spec(base, t["values"], sweep.uri, t["id"]).scaling.num_workers == 1 for t in to_run)
    if sweep.exists(TUNE_DIR):
        sweep.delete_dir(TUNE_DIR)   # a previous attempt's Tune state: never read, so not kept
    return ray.tune.Tuner(
        trainable, param_space={"trial": ray.tune.grid_search(to_run)},
        tune_config=ray.tune.TuneConfig(scheduler=make_scheduler(spec, sweep, kept), num_samples=1,
                                        max_concurrent_trials=spec.sweep.max_concurrent_trials or default_concurrency(spec),
                                        trial_dirname_creator=lambda trial: trial.config["trial"]["id"],
                                        trial_name_creator=lambda trial: trial.config["trial"]["id"],
                                        reuse_actors=in_trial),
        run_config=ray.tune.RunConfig(name=TUNE_DIR, storage_path=sweep.uri, verbose=0, stop=_stop_all_when(interrupted),
                                      callbacks=[_status_recorder(sweep, state, interrupted)]),
    )


def open_sweep(spec: JobSpec, sweep: RunFolder, resume: bool, console: Console) -> tuple[dict, list[dict]]:
    """(the sweep's record, the trials to run): a new record, or with --resume the saved one."""
    state = read_state(sweep) if resume else None
    if state is None:
        if resume:
            console.print(f"nothing to resume in {sweep.uri} (no {SWEEP_STATE_FILE}): starting the sweep")
        state = {"version": STATE_VERSION, "name": spec.name, "seed": spec.seed, "space": spec.sweep.space,
                 "trials": sample_trials(spec)}
        sweep.write_json(SWEEP_STATE_FILE, state)
        return state, list(state["trials"])
    for trial in state["trials"]:   # finished before the interruption, but Tune had not said so yet
        if trial_status(trial_folder(sweep, trial["id"]), spec.schedule.epochs, trial["status"]) == "completed":
            trial["status"] = "ended"
    sweep.write_json(SWEEP_STATE_FILE, state)
    to_run = [t for t in state["trials"] if t["status"] != "ended"]
    console.print(f"resuming the sweep in {sweep.uri}: {len(state['trials']) - len(to_run)} of "
                  f"{len(state['trials'])} trials ended, {len(to_run)} to run (each from its latest checkpoint)")
    return state, to_run


def run_sweep(spec: JobSpec, raw: dict, console: Console, resume: bool = False, verbose: bool = False) -> dict:
    """Run (or resume) the sweep; print the leaderboard; write results.parquet and best.yaml."""
    import os

    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # Tune's own reporter, silent at verbose=0
    sweep, sweep_cfg = RunFolder(spec.run.storage, spec.name), spec.sweep
    state, to_run = open_sweep(spec, sweep, resume, console)
    spec, parent = open_sweep_tracking(spec, sweep, console.print)
    if to_run:
        console.print(f"sweep {spec.name}: {len(state['trials'])} trials of {', '.join(sweep_cfg.space)}; ASHA over "
                      f"{spec.schedule.epochs} epochs (grace {sweep_cfg.asha.grace_period}, reduction {sweep_cfg.asha.reduction_factor:g}); "
                      f"{sweep_cfg.max_concurrent_trials or default_concurrency(spec)} trial(s) at once, "
                      f"{spec.scaling.num_workers} worker(s) each")
        interrupted = Interruption()
        _run_tuner(make_tuner(spec, sweep, state, to_run, interrupted), interrupted, sweep, spec, state, console)
    summary = finish_sweep(spec, raw, sweep, leaderboard_rows(sweep, spec, state["trials"]), console)
    if parent:
        parent.finish(sweep, {"status": "completed"}, [SWEEP_BEST_FILE, SWEEP_RESULTS_FILE], None)
    return summary


STOP_WAIT_S = 60.0
"""after Ctrl-C, how long the trials get to stop before Ray is shut down under them"""


def _run_tuner(tuner, interrupted: Interruption, sweep: RunFolder, spec: JobSpec, state: dict, console: Console) -> None:
    """tuner.fit() in a thread while the leaderboard refreshes. Ctrl-C sets `interrupted`, which stops the
    trials; Ray is shut down once fit() has returned (a Ray call from the tuner thread after shutdown
    would end the process with exit code 1), or after STOP_WAIT_S, or at a second Ctrl-C."""
    outcome: dict = {}
    done = threading.Event()

    def fit() -> None:
        try:
            outcome["grid"] = tuner.fit()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=fit, name="tuner", daemon=True).start()
    try:
        with Live(leaderboard([], spec, "leaderboard"), console=console, refresh_per_second=1, transient=True) as live:
            while not done.wait(timeout=2.0):
                live.update(leaderboard(leaderboard_rows(sweep, spec, state["trials"]), spec,
                                        f"leaderboard ({time.strftime('%H:%M:%S')})"))
    except KeyboardInterrupt:
        from orchestrator.cluster.session import stop_ray

        interrupted.set()
        console.print("[dim]waiting for the trials to stop (Ctrl-C again to stop at once)[/dim]")
        try:
            done.wait(timeout=STOP_WAIT_S)
        except KeyboardInterrupt:
            pass
        stop_ray(console)
        raise SweepInterrupted(f"interrupted: trials stopped; finished trials and checkpoints are kept in {sweep.uri}; "
                               "continue with: orchestrator sweep JOB --resume") from None
    if "error" in outcome:
        raise outcome["error"]


