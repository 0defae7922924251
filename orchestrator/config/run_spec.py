"""The job spec's run and sweep sections: where the run folder is, what it keeps, tracking, the sweep."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from orchestrator.config.catalog import WATCHABLE
from orchestrator.config.section import _Section, named


class MlflowSpec(_Section):
    """MLflow tracking of the run (train/tracking.py); the `[mlflow]` extra."""

    tracking_uri: str | None = None
    """http(s)://HOST:PORT of a tracking server, sqlite:///PATH, or a folder; null: MLFLOW_TRACKING_URI"""
    experiment: str | None = None
    """the MLflow experiment the run goes in (made when missing); null: orchestrator"""
    parent_run_id: str | None = None
    """the MLflow run this one is a child of (orchestrator sweep sets it for its trials)"""


class RunSpec(_Section):
    storage: str = "./runs"
    """local path or URI shared by all nodes; the run folder is <storage>/<name>/"""
    mlflow: MlflowSpec | None = None
    """{tracking_uri, experiment}: log params, metrics, artifacts and the model to MLflow (rank 0); null: only
    when MLFLOW_TRACKING_URI is set"""
    keep_best: int = Field(1, ge=1)
    """the best checkpoints kept (by val acc@1, ties by val loss) besides the latest keep_checkpoints: the best in
    checkpoint_best/; with K > 1 the K best also in checkpoint_best_epoch_NNNN/"""
    keep_checkpoints: int = Field(2, ge=1)
    """latest epoch checkpoints kept (the best is kept besides)"""
    max_failures: int = Field(2, ge=0)
    """worker-group restarts from the latest checkpoint before the run fails"""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bitwise-repeatable on CPU, slower"""
    checkpoint_every_steps: int | None = Field(None, ge=1)
    """also checkpoint every this many optimizer steps inside an epoch (a killed run resumes at the next
    step); None: at epoch ends only"""


class AshaSpec(_Section):
    grace_period: int = Field(1, ge=1)
    """epochs every trial runs before it can be stopped"""
    reduction_factor: float = Field(3, gt=1)
    """ASHA keeps 1 / reduction_factor of the trials at each rung"""


class SweepSpec(_Section):
    metric: str = "val_acc1"
    """a name of catalog.WATCHABLE"""
    mode: Literal["max", "min"] = "max"
    """whether a higher or a lower sweep.metric is better"""
    num_samples: int = Field(8, ge=1)
    """trials"""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """trials at once; `null` = what the cluster fits"""
    asha: AshaSpec = Field(default_factory=AshaSpec)
    """ASHA's early stopping (epochs are its time unit; max_t = schedule.epochs)"""
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """`{optim.base_lr: {loguniform: [1e-4, 1e-1]}, schedule.name: {choice: [cosine, step]}}`; kinds `loguniform`, `uniform`, `randint`, `choice`, `grid`"""

    _known_metric = named("metric", WATCHABLE, "metric")
