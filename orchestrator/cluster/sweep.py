"""`orchestrator sweep`: a search over any job-file keys with Ray Tune; a one-worker trial runs the loop in
its own Tune actor, a multi-worker trial is a TorchTrainer run.

`sweep.search` picks the trials: `random` (Tune's variant generator over `sweep.space`, seeded by the job's
`seed`, every draw recorded up front), `grid` (every combination), or `tpe` (Optuna's TPE, each trial
suggested from the results so far when Tune has room for it). They are recorded in `sweep.json` (trial id,
values, its end as Tune reports it: `ended` = completed or stopped early, `error`) and handed to Tune by
the `searcher.recorded_search`. A Tune function trainable (`run_trial`) applies a trial's values to the
job, re-plans it (a swept batch size moves the scaled LR), and either runs `fit` itself (one worker) or
fits a `TorchTrainer` whose `TuneReportCallback` hands every epoch's metrics to Tune. `sweep.scheduler`:
ASHA (`AsyncHyperBandScheduler`, time unit epochs, max_t = schedule.epochs) stops the weak trials, or
PBT (`cluster.pbt`) evolves the population. Each trial's run folder is `<sweep folder>/trials/<trial_id>/`;
the sweep folder gets `results.parquet` and `best.yaml`.

`--resume` reads only JSON, YAML and weights-only checkpoints: trials that ended are kept, the rest run
again (resuming from their own checkpoints), under a new ASHA that first learns the kept trials' epoch
results; TPE is rebuilt from the same record. `--extend N` adds N trials (draws, for random) to a sweep.
Tune's own saved state (`tune/`, which holds pickles) is never read: a file planted in shared storage
cannot run code here.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from orchestrator.cluster.leaderboard import finish_sweep, leaderboard_rows
from orchestrator.cluster.pbt import run_pbt
from orchestrator.cluster.searcher import new_record, recorded_search
from orchestrator.cluster.suggest import draw_random, grid_values
from orchestrator.cluster.tune_run import Interruption, run_tuner, stop_all_when
from orchestrator.config.errors import SpecError
from orchestrator.config.jobfile import validate_spec
from orchestrator.config.keys import with_values
from orchestrator.config.spec import JobSpec
from orchestrator.store.runs import trial_folder, trial_status
from orchestrator.store.storage import METRICS_FILE, SWEEP_BEST_FILE, SWEEP_RESULTS_FILE, SWEEP_STATE_FILE, RunFolder, trials_storage
from orchestrator.train.tracking import open_sweep_tracking

TUNE_DIR = "tune"
STATE_VERSION = 1
TRIAL_DRIVER_MEMORY_BYTES = 256 * 2**20
TIME_ATTR = "epochs_done"   # reported with every epoch; unlike Tune's iteration count it survives resumes


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
    plan = resolve_plan(spec, spec.scaling.max_workers).plan
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
        if scaling.max_workers == 1:
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
        return max(1, int(total.get("GPU", 0) // spec.scaling.max_workers))
    return max(1, int(total.get("CPU", 1) // (spec.scaling.max_workers * spec.scaling.cpus_per_worker)))


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


def make_tuner(spec: JobSpec, sweep: RunFolder, state: dict, to_run: list[dict], interrupted: Interruption,
               stop_at_epoch: int | None = None):
    """A new Tuner: `to_run` first, then (search tpe) new trials up to state["target"]; ASHA, or with
    `stop_at_epoch` (a PBT generation) every trial stopped after that epoch. Tune's state goes to `tune/`,
    never read back. Setting `interrupted` stops every trial and ends fit()."""
    import ray.tune
    from ray.tune.schedulers import FIFOScheduler

    running = {t["id"] for t in to_run}
    kept = [t for t in state["trials"] if t["id"] not in running]
    base = spec.to_dict()
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, base=base, sweep_uri=sweep.uri),
                                        trial_resources(base, sweep.uri))
    # One-worker trials run in their Tune actor: a finished or stopped trial's actor (imports done, data cached)
    # takes the next trial. A trial driving a TorchTrainer gets a fresh actor.
    in_trial = spec.scaling.max_workers == 1 and "scaling.num_workers" not in spec.sweep.space
    if sweep.exists(TUNE_DIR):
        sweep.delete_dir(TUNE_DIR)   # a previous attempt's Tune state: never read, so not kept
    scheduler = FIFOScheduler() if stop_at_epoch else make_scheduler(spec, sweep, kept)
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(search_alg=recorded_search(spec, sweep, state, to_run, interrupted),
                                        scheduler=scheduler, num_samples=len(to_run) + state["target"] - len(state["trials"]),
                                        max_concurrent_trials=spec.sweep.max_concurrent_trials or default_concurrency(spec),
                                        trial_dirname_creator=lambda trial: trial.config["trial"]["id"],
                                        trial_name_creator=lambda trial: trial.config["trial"]["id"],
                                        reuse_actors=in_trial),
        run_config=ray.tune.RunConfig(name=TUNE_DIR, storage_path=sweep.uri, verbose=0,
                                      stop=stop_all_when(interrupted, TIME_ATTR, stop_at_epoch)),
    )


def new_state(spec: JobSpec) -> dict:
    """A new sweep's record: random and grid trials drawn now, TPE's when Tune has room for them."""
    cfg = spec.sweep
    state = {"version": STATE_VERSION, "name": spec.name, "seed": spec.seed, "space": cfg.space, "search": cfg.search,
             "draws": 0, "target": cfg.num_samples, "trials": []}
    if cfg.search == "random":
        add_draws(state, cfg.space, cfg.num_samples)
    elif cfg.search == "grid":
        state["trials"] = [new_record(i, values) for i, values in enumerate(grid_values(cfg.space))]
        state["target"] = len(state["trials"])
    return state


def add_draws(state: dict, space: dict, count: int) -> None:
    """`count` more random draws of the space into the record (draw k is the same in any sweep of this seed)."""
    drawn = draw_random(space, state["seed"], state["draws"], count)
    state["trials"] += [new_record(len(state["trials"]) + i, values) for i, values in enumerate(drawn)]
    state["draws"] += count
    state["target"] = len(state["trials"])


def extend_state(spec: JobSpec, state: dict, more: int) -> None:
    """--extend: `more` trials (random: draws) beyond what the record holds or aims at."""
    search = state.get("search", "random")
    if search == "grid" or spec.sweep.scheduler == "pbt":
        raise SpecError([f"--extend: a {'grid' if search == 'grid' else 'PBT'} sweep has a fixed set of trials; "
                         "extend one with sweep.search random or tpe"])
    if search == "random":
        state.setdefault("draws", len(state["trials"]))
        add_draws(state, spec.sweep.space, more)
    else:
        state["target"] = max(state.get("target", 0), len(state["trials"])) + more


def open_sweep(spec: JobSpec, sweep: RunFolder, resume: bool, console: Console, extend: int = 0) -> tuple[dict, list[dict]]:
    """(the sweep's record, the recorded trials to run): a new record, or with --resume / --extend the saved one."""
    state = read_state(sweep) if resume or extend else None
    if state is None:
        if extend:
            raise SpecError([f"--extend: no sweep to extend in {sweep.uri} (no {SWEEP_STATE_FILE}); run the sweep first"])
        if resume:
            console.print(f"nothing to resume in {sweep.uri} (no {SWEEP_STATE_FILE}): starting the sweep")
        state = new_state(spec)
        sweep.write_json(SWEEP_STATE_FILE, state)
        return state, list(state["trials"])
    state.setdefault("target", len(state["trials"]))
    for trial in state["trials"]:   # finished before the interruption, but Tune had not said so yet
        if trial_status(trial_folder(sweep, trial["id"]), spec.schedule.epochs, trial["status"]) == "completed":
            trial["status"] = "ended"
    before = len(state["trials"])
    ended = sum(t["status"] == "ended" for t in state["trials"])
    if extend:
        extend_state(spec, state, extend)
    sweep.write_json(SWEEP_STATE_FILE, state)
    console.print(f"{'extending' if extend else 'resuming'} the sweep in {sweep.uri}: {ended} of {before} trials ended, "
                  f"{before - ended} to run again (each from its latest checkpoint)"
                  + (f", {state['target'] - before} new" if extend else ""))
    return state, [t for t in state["trials"] if t["status"] != "ended"]


def describe(spec: JobSpec, state: dict) -> str:
    cfg = spec.sweep
    if cfg.scheduler == "pbt":
        how = (f"PBT over {spec.schedule.epochs} epochs (perturbing every {cfg.pbt.perturbation_interval}, "
               f"quantile {cfg.pbt.quantile_fraction:g})")
    else:
        how = (f"ASHA over {spec.schedule.epochs} epochs (grace {cfg.asha.grace_period}, "
               f"reduction {cfg.asha.reduction_factor:g})")
    return (f"sweep {spec.name}: {state['target']} trials of {', '.join(cfg.space)} ({state.get('search', 'random')} "
            f"search); {how}; {cfg.max_concurrent_trials or default_concurrency(spec)} trial(s) at once, "
            f"{spec.scaling.max_workers} worker(s) each")


def run_sweep(spec: JobSpec, raw: dict, console: Console, resume: bool = False, verbose: bool = False,
              extend: int = 0) -> dict:
    """Run (or resume, or extend by `extend` trials) the sweep; print the leaderboard; write results.parquet
    and best.yaml."""
    import os

    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # Tune's own reporter, silent at verbose=0
    sweep = RunFolder(spec.run.storage, spec.name)
    state, to_run = open_sweep(spec, sweep, resume, console, extend)
    spec, parent = open_sweep_tracking(spec, sweep, console.print)
    if to_run or len(state["trials"]) < state["target"]:
        console.print(describe(spec, state))
        if spec.sweep.scheduler == "pbt":
            run_pbt(spec, sweep, state, console, lambda trials, end: _tune(spec, sweep, state, trials, console, end))
        else:
            _tune(spec, sweep, state, to_run, console)
    summary = finish_sweep(spec, raw, sweep, leaderboard_rows(sweep, spec, state["trials"]), console)
    if parent:
        parent.finish(sweep, {"status": "completed"}, [SWEEP_BEST_FILE, SWEEP_RESULTS_FILE], None)
    return summary


def _tune(spec: JobSpec, sweep: RunFolder, state: dict, to_run: list[dict], console: Console,
          stop_at_epoch: int | None = None) -> None:
    interrupted = Interruption()
    tuner = make_tuner(spec, sweep, state, to_run, interrupted, stop_at_epoch)
    run_tuner(tuner, interrupted, sweep, spec, state["trials"], console)
