"""MLflow tracking of a run (`run.mlflow: {tracking_uri, experiment}`, or MLFLOW_TRACKING_URI), by rank 0.

What is logged: the job's keys as params (flattened, `optim.base_lr`), the plan's figures as params
(`plan.global_batch_size`, ...), every epoch's metric row at its optimizer step, the loss and each
group's LR at the steps the progress line reads them (about 2/s), and at the end summary.json,
plan.json, spec.yaml and the report as artifacts, model.safetensors with its classes as a logged
model. The MLflow run's id is kept in the run folder (`mlflow.json`, JSON): a resumed run logs into the
same MLflow run. A sweep is a parent run, each trial a child (`parent_run_id`). A tracking server that
is down or refuses costs one warning line and tracking stops for the run; training never fails for it.
Every call is synchronous (at most ~2 a second), so a failure is seen where it happens.
Imports no Ray; mlflow is imported only when tracking is on (the `[mlflow]` extra).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.config.spec import JobSpec, MlflowSpec
from orchestrator.store.metrics import lr_column
from orchestrator.store.storage import RunFolder

MLFLOW_FILE = "mlflow.json"
"""the run folder's record of its MLflow run: {"tracking_uri", "run_id"}"""
PARAM_VALUE_CHARS = 6000
"""MLflow keeps a param value up to this many characters"""


def tracking_uri(spec: JobSpec) -> str | None:
    """run.mlflow.tracking_uri, else MLFLOW_TRACKING_URI when run.mlflow is set or the variable is; None: off."""
    configured = spec.run.mlflow
    if configured is not None and configured.tracking_uri:
        return configured.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def flat_params(values: dict, prefix: str = "") -> dict[str, str]:
    """{'optim.base_lr': '0.1', ...}: nested keys joined by dots, lists and None as JSON."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = (json.dumps(value) if not isinstance(value, str) else value)[:PARAM_VALUE_CHARS]
    return out


def metric_name(name: str) -> str:
    """A metric name MLflow accepts: a group's ' [x]' suffixes become ':x' (lr/rest [norm/bias] -> lr/rest:norm/bias)."""
    return name.replace(" [", ":").replace("]", "")


class MlflowLog:
    """One run's MLflow run, through MlflowClient (explicit run ids, no process-global active run)."""

    def __init__(self, client, run_id: str, warn: Callable[[str], None]):
        self.client, self.run_id, self.warn = client, run_id, warn
        self.live = True

    def _call(self, what: str, action: Callable[[], object]) -> None:
        """Run one MLflow call; on any error warn once and stop tracking (training goes on)."""
        if not self.live:
            return
        try:
            action()
        except Exception as exc:   # a tracking server down, refusing, or full: never the run's failure
            self.live = False
            text = " ".join(str(exc).split())[:300]
            self.warn(f"warning: mlflow: {what} failed ({type(exc).__name__}: {text}); tracking is off for this run")

    def step(self, step: int, loss: float | None, lrs: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_name(lr_column(name)), lr, now, step + 1) for name, lr in lrs.items()]
        if loss is not None:
            metrics.append(Metric("step_train_loss_rank0", loss, now, step + 1))
        self._call("logging step metrics", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(row["step"])) for key, value in row.items()
                   if key not in ("epoch", "step") and not key.startswith("lr/") and isinstance(value, (int, float))]
        metrics.append(Metric("epoch", float(row["epoch"] + 1), now, int(row["step"])))
        self._call("logging an epoch", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def catch_up(self, rows: list[dict]) -> None:
        """A resumed run: log the checkpoint's epoch rows the MLflow run does not have yet (an attempt that
        stopped between its checkpoint and its MLflow call), each once."""
        logged: set[int] = set()
        self._call("reading the run's epochs", lambda: logged.update(
            int(m.step) for m in self.client.get_metric_history(self.run_id, "epoch")))
        for row in rows:
            if self.live and int(row["step"]) not in logged:
                self.epoch(row)

    def log_files(self, artifact_path: str | None, files: dict[str, bytes]) -> None:
        """Files (name -> bytes) as artifacts under artifact_path (None: the run's artifact root)."""
        def log() -> None:
            with tempfile.TemporaryDirectory() as staging:
                for name, data in files.items():
                    (Path(staging) / name).write_bytes(data)
                self.client.log_artifacts(self.run_id, staging, artifact_path=artifact_path)

        self._call(f"logging {artifact_path or ', '.join(files)}", log)

    def finish(self, folder: RunFolder, summary: dict, files: list[str], classes: list[str] | None) -> None:
        """The run's files as artifacts, model.safetensors as a logged model, the run's end status."""
        self.log_files(None, {name: folder.read_bytes(name) for name in files if folder.exists(name)})
        if folder.exists("model.safetensors"):
            self._call("logging the model", lambda: self._model(folder, summary, classes))
        status = "FINISHED" if summary.get("status") == "completed" else "FAILED"
        self._call("ending the run", lambda: self.client.set_terminated(self.run_id, status))

    def _model(self, folder: RunFolder, summary: dict, classes: list[str] | None) -> None:
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        model = self.client.create_logged_model(experiment_id, name=summary.get("name") or "model", source_run_id=self.run_id,
                                                params={"classes": json.dumps(classes or [])})
        with tempfile.TemporaryDirectory() as staging:
            (Path(staging) / "model.safetensors").write_bytes(folder.read_bytes("model.safetensors"))
            (Path(staging) / "classes.json").write_text(json.dumps(classes or []))
            self.client.log_model_artifacts(model.model_id, staging)
        self.client.finalize_logged_model(model.model_id, "READY")

    def fail(self, status: str) -> None:
        self._call("ending the run", lambda: self.client.set_terminated(self.run_id, status))


SHORT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
"""MLflow's HTTP settings for our client: a dropped keep-alive connection (the server closed it as the
request went out) is retried; a server that is down costs one warning after about two seconds, not
MLflow's default of minutes (7 retries, backoff factor 2)."""


def use_short_retries() -> None:
    """SHORT_RETRIES for this process, each unless the user set it."""
    for name, value in SHORT_RETRIES.items():
        os.environ.setdefault(name, value)


def open_tracking(spec: JobSpec, folder: RunFolder, plan_dict: dict, warn: Callable[[str], None]) -> MlflowLog | None:
    """The MLflow run of this run folder (the one mlflow.json names when resuming, else a new one with
    the spec and plan as params), or None when tracking is off or the server cannot be reached."""
    uri = tracking_uri(spec)
    if uri is None:
        return None
    use_short_retries()
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run_id = _resumed_run_id(folder, uri) or _new_run(client, spec, plan_dict)
    except ImportError:
        warn("warning: mlflow: tracking asked for but mlflow is not installed (pip install 'orchestrator[mlflow]'); "
             "tracking is off for this run")
        return None
    except Exception as exc:
        warn(f"warning: mlflow: cannot reach {uri} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
             "tracking is off for this run")
        return None
    folder.write_json(MLFLOW_FILE, {"tracking_uri": uri, "run_id": run_id})
    return MlflowLog(client, run_id, warn)


def _recorded(folder: RunFolder) -> dict:
    """The run folder's mlflow.json ({} when there is none)."""
    return json.loads(folder.read_bytes(MLFLOW_FILE)) if folder.exists(MLFLOW_FILE) else {}


def _resumed_run_id(folder: RunFolder, uri: str) -> str | None:
    recorded = _recorded(folder)
    return recorded.get("run_id") if recorded.get("tracking_uri") == uri else None


def _new_run(client, spec: JobSpec, plan_dict: dict) -> str:
    configured = spec.run.mlflow
    name = (configured.experiment if configured and configured.experiment else None) or "orchestrator"
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    tags = {"orchestrator.run_folder": f"{spec.run.storage}/{spec.name}"}
    if configured is not None and configured.parent_run_id:
        tags["mlflow.parentRunId"] = configured.parent_run_id
    run = client.create_run(experiment_id, run_name=spec.name, tags=tags)
    from mlflow.entities import Param

    plan_figures = {k: v for k, v in plan_dict.items() if k != "param_groups"}
    params = {**flat_params(spec.model_dump(mode="json")), **flat_params(plan_figures, "plan.")}
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):   # MLflow takes at most 100 params a batch
        client.log_batch(run.info.run_id, params=items[start:start + 100])
    return run.info.run_id


def finish_tracking(tracker: MlflowLog, folder: RunFolder, summary: dict, classes: list[str]) -> None:
    """The end of a tracked run: its files as artifacts, the model, the status (the driver adds the report:
    `reopen_tracking`)."""
    from orchestrator.store.storage import METRICS_FILE, PLAN_FILE, SPEC_FILE, SUMMARY_FILE

    tracker.finish(folder, summary, [SUMMARY_FILE, PLAN_FILE, SPEC_FILE, METRICS_FILE], classes)


def reopen_tracking(folder: RunFolder, warn: Callable[[str], None]) -> MlflowLog | None:
    """The MLflow run a run folder's mlflow.json names (the driver logs the report into it), or None."""
    recorded = _recorded(folder)
    if not recorded:
        return None
    use_short_retries()
    try:
        from mlflow import MlflowClient

        return MlflowLog(MlflowClient(tracking_uri=recorded["tracking_uri"]), recorded["run_id"], warn)
    except ImportError:
        return None


def open_sweep_tracking(spec: JobSpec, sweep: RunFolder, warn: Callable[[str], None]) -> tuple[JobSpec, MlflowLog | None]:
    """A sweep's parent MLflow run (resumed from the sweep folder's mlflow.json) and the spec its trials
    run with: run.mlflow naming the tracking URI and the parent, so each trial is a child run."""
    parent = open_tracking(spec, sweep, {}, warn)
    if parent is None:
        return spec, None
    trials = MlflowSpec(tracking_uri=tracking_uri(spec), parent_run_id=parent.run_id,
                        experiment=spec.run.mlflow.experiment if spec.run.mlflow else None)
    return spec.model_copy(update={"run": spec.run.model_copy(update={"mlflow": trials})}), parent
