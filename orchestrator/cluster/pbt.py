"""Population Based Training over a sweep's trials, in generations the sweep's own record can resume.

Every trial trains `sweep.pbt.perturbation_interval` epochs (a Tune run over the population that stops each
trial at the generation's last epoch); then the bottom quantile by sweep.metric each take a top trial's
latest epoch checkpoint (copied into their own run folder, their own metric rows kept) and that trial's values perturbed
(`suggest.pbt_pairs`, `suggest.perturb`, seeded by (seed, epoch)). A recipient resumes from the copied
checkpoint with its new values: optimizer state and step come from the checkpoint, hyperparameters from the
job (`train.resume.load_optimizer_state`), so the schedule stays a function of the step with the new base
LR from then on; its metrics.parquet goes on from its own rows (the metric and the LR column show the
jump). Each perturbation is written to sweep.json (`lineage` of the trial, `pbt_epoch` of the sweep)
before the next generation starts, so a resumed sweep repeats nothing and a perturbed trial resumes exactly.

Tune's own PopulationBasedTraining is not used: it moves Tune checkpoints between trials and can only be
resumed from Tune's pickled experiment state, which this tool never reads.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console

from orchestrator.cluster.suggest import pbt_pairs, perturb
from orchestrator.config.spec import JobSpec
from orchestrator.train.checkpoint import with_rows
from orchestrator.store.runs import read_metrics, trial_folder
from orchestrator.store.storage import CHECKPOINT_FILE, STEP_CHECKPOINT, STEP_DIR, SWEEP_STATE_FILE, RunFolder, epoch_dir_name


def generation_ends(interval: int, epochs: int) -> list[int]:
    """The epochs (counted from 1) at which generations end: every `interval`, and the last."""
    return [*range(interval, epochs, interval), epochs]


def epochs_run(sweep: RunFolder, trial: dict) -> int:
    return len(read_metrics(trial_folder(sweep, trial["id"])))


def run_pbt(spec: JobSpec, sweep: RunFolder, state: dict, console: Console,
            run_generation: Callable[[list[dict], int], None]) -> None:
    """Every generation the record has not finished: its trials to its end (`run_generation(trials, end)`),
    then the perturbation at its end (unless done before an interruption, or at the last epoch)."""
    cfg, epochs = spec.sweep.pbt, spec.schedule.epochs
    for end in generation_ends(cfg.perturbation_interval, epochs):
        if end < epochs and state.get("pbt_epoch", 0) >= end:
            continue
        behind = [t for t in state["trials"] if epochs_run(sweep, t) < end]
        if behind:
            run_generation(behind, end)
        if end == epochs:
            return
        for trial in state["trials"]:   # stopped at the generation's end, not finished
            if trial["status"] == "ended":
                trial["status"] = "running"
        _exploit_and_explore(spec, sweep, state, end, console)


def _score_at(sweep: RunFolder, trial: dict, metric: str, end: int) -> float | None:
    rows = read_metrics(trial_folder(sweep, trial["id"]))
    return rows[end - 1].get(metric) if len(rows) >= end else None


def _exploit_and_explore(spec: JobSpec, sweep: RunFolder, state: dict, end: int, console: Console) -> None:
    cfg = spec.sweep
    by_id = {t["id"]: t for t in state["trials"]}
    scores = {t["id"]: _score_at(sweep, t, cfg.metric, end) for t in state["trials"]}
    for recipient_id, donor_id in pbt_pairs(scores, cfg.mode, cfg.pbt.quantile_fraction, spec.seed, end):
        recipient, donor = by_id[recipient_id], by_id[donor_id]
        copy_checkpoint(trial_folder(sweep, donor_id), trial_folder(sweep, recipient_id), end - 1, spec.run.keep_checkpoints)
        values = perturb(donor["values"], cfg.space, cfg.pbt.resample_probability, spec.seed, end,
                         int(recipient_id.rsplit("_", 1)[-1]))
        recipient["values"] = values
        recipient.setdefault("lineage", []).append({"epoch": end, "from": donor_id, "values": values,
                                                    "from_values": dict(donor["values"]), "score": scores[recipient_id],
                                                    "from_score": scores[donor_id]})
        console.print(f"PBT after epoch {end}: {recipient_id} ({cfg.metric} {_fmt(scores[recipient_id])}) takes "
                      f"{donor_id}'s checkpoint ({_fmt(scores[donor_id])}) with "
                      + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    state["pbt_epoch"] = end
    sweep.write_json(SWEEP_STATE_FILE, state)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def copy_checkpoint(donor: RunFolder, recipient: RunFolder, epoch: int, keep: int) -> None:
    """The donor's checkpoint of `epoch` (counted from 0) becomes the recipient's latest, with the recipient's
    own metric rows (its history stays its own; weights, optimizer state, step and metric history are the
    donor's). The recipient's mid-epoch checkpoint, if any, goes (it is of its old weights)."""
    relative = f"{epoch_dir_name(epoch)}/{CHECKPOINT_FILE}"
    data = with_rows(donor.read_bytes(relative), f"{donor.uri}/{relative}", read_metrics(recipient)[:epoch + 1])
    recipient.write_epoch_checkpoint(epoch, data, keep)
    if recipient.exists(STEP_CHECKPOINT):
        recipient.delete_dir(STEP_DIR)
