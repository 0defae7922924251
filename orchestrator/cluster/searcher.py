"""The sweep's Ray Tune searcher: hands Tune the trials of sweep.json, suggesting new ones with TPE, and
writes each trial's end into sweep.json.

Nothing of it is saved by Tune or read back: sweep.json and the trials' metrics are the whole record, and a
resumed sweep rebuilds the TPE history from them (`history`).
"""

from __future__ import annotations

from orchestrator.cluster.suggest import Finished, suggest_tpe
from orchestrator.cluster.tune_run import Interruption
from orchestrator.config.spec import JobSpec
from orchestrator.store.runs import read_metrics, trial_folder
from orchestrator.store.storage import SWEEP_STATE_FILE, RunFolder


def new_record(number: int, values: dict) -> dict:
    return {"id": f"trial_{number:04d}", "values": values, "status": "pending"}


def history(sweep: RunFolder, spec: JobSpec, trials: list[dict]) -> list[Finished]:
    """What the searcher is told of each recorded trial: its values, its metric per epoch and how it ended."""
    told = []
    for trial in trials:
        rows = read_metrics(trial_folder(sweep, trial["id"]))
        scores = [row.get(spec.sweep.metric) for row in rows]
        if trial["status"] == "error":
            state = "error"
        elif len(rows) >= spec.schedule.epochs:
            state = "completed"
        else:
            state = "stopped" if trial["status"] == "ended" else "running"
        told.append(Finished(trial["values"], scores, state))
    return told


def next_values(sweep: RunFolder, spec: JobSpec, state: dict) -> dict:
    """The values of the next new trial (sweep.search: tpe), from every trial recorded so far."""
    cfg = spec.sweep
    return suggest_tpe(cfg.space, spec.seed, len(state["trials"]), cfg.startup_trials, cfg.mode,
                       history(sweep, spec, state["trials"]))


def recorded_search(spec: JobSpec, sweep: RunFolder, state: dict, to_run: list[dict], interrupted: Interruption):
    """A Tune Searcher: first the recorded trials `to_run` (in order), then, while sweep.json holds fewer than
    state["target"] trials, new ones from `next_values`, each recorded before Tune sees it."""
    from ray.tune.search import Searcher

    class RecordedSearch(Searcher):
        def __init__(self):
            super().__init__(metric=spec.sweep.metric, mode=spec.sweep.mode)
            self.queue = list(to_run)
            self.live: dict[str, dict] = {}

        def set_search_properties(self, metric, mode, config, **spec_) -> bool:
            return True

        def suggest(self, trial_id: str):
            if interrupted.is_set():
                return Searcher.FINISHED
            if self.queue:
                record = self.queue.pop(0)
            elif len(state["trials"]) < state["target"]:
                record = new_record(len(state["trials"]), next_values(sweep, spec, state))
                state["trials"].append(record)
                sweep.write_json(SWEEP_STATE_FILE, state)
            else:
                return Searcher.FINISHED
            self.live[trial_id] = record
            return {"trial": record}

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            record = self.live.pop(trial_id, None)
            if record is None or interrupted.is_set():   # after Ctrl-C, stopped trials stay unfinished
                return
            record["status"] = "error" if error else "ended"
            sweep.write_json(SWEEP_STATE_FILE, state)

        def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
            """Nothing: sweep.json is the searcher's whole state."""

    return RecordedSearch()
