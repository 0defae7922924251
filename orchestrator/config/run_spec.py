"""The job spec's scaling, run and sweep sections: how many workers (a fixed count or an elastic range), where
the run folder is, what it keeps, tracking, the sweep."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from orchestrator.config.catalog import SEARCHES, TRIAL_MEASURES, WATCHABLE
from orchestrator.config.section import _Section, named


class WorkerRange(_Section):
    """An elastic worker count: the run takes what the cluster gives between min and max."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @field_validator("max")
    @classmethod
    def _not_below_min(cls, value: int, info) -> int:
        if "min" in info.data and value < info.data["min"]:
            raise ValueError(f"max {value} is below min {info.data['min']}")
        return value


def _count_or_range(value) -> str:
    """Which form of scaling.num_workers a value is (so an error names only that form's problem)."""
    return "<range>" if isinstance(value, (dict, WorkerRange)) else "<count>"


class ScalingSpec(_Section):
    num_workers: Annotated[Annotated[int, Field(ge=1), Tag("<count>")] | Annotated[WorkerRange, Tag("<range>")],
                           Discriminator(_count_or_range)] = 2
    """Ray Train workers (one GPU each with `use_gpu`); `{min: M, max: N}`: elastic, as many as the cluster
    gives between M and N, the global batch kept at every size (per-worker batch and accumulation
    re-derived; the plan lists them)"""
    use_gpu: bool = False
    """one GPU per worker, NCCL; otherwise CPU and gloo"""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved per worker; torch uses that many threads"""
    per_worker_batch_size: int = Field(32, ge=1)
    """images per worker per micro-step; global batch = this x num_workers x grad_accum_steps"""
    grad_accum_steps: int = Field(1, ge=1)
    """micro-steps per optimizer step (DDP syncs only on the last)"""
    amp: Literal["none", "bf16", "fp16"] = "none"
    """`none`, `bf16` (CPU or GPU), `fp16` (GPU, with a GradScaler)"""
    channels_last: bool = False
    """NHWC memory format"""
    placement: Literal["pack", "spread"] | None = None
    """spread: one worker per node as far as the cluster's nodes go (Ray's SPREAD); pack: fill a node first (PACK);
    null: placement_strategy decides"""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement of the workers: `PACK`, `SPREAD`, `STRICT_PACK`, `STRICT_SPREAD`"""
    sync_bn: bool = False
    """SyncBatchNorm across workers"""

    @field_validator("placement_strategy")
    @classmethod
    def _one_placement(cls, value: str, info) -> str:
        placement = info.data.get("placement")
        if placement is not None and value != "PACK" and value != placement.upper():
            raise ValueError(f"{value} contradicts scaling.placement {placement}; give one of them")
        return value

    @property
    def ray_placement(self) -> str:
        """The Ray placement strategy of the workers' placement group."""
        return self.placement.upper() if self.placement else self.placement_strategy

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, WorkerRange)

    @property
    def max_workers(self) -> int:
        """The most workers the run uses: num_workers, or its max when elastic (the size the global batch is of)."""
        return self.num_workers.max if self.elastic else self.num_workers

    @property
    def min_workers(self) -> int:
        return self.num_workers.min if self.elastic else self.num_workers


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


class PbtSpec(_Section):
    perturbation_interval: int = Field(1, ge=1)
    """epochs between perturbations: every trial trains this many, then the weak ones take a strong one's checkpoint"""
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    """the bottom fraction of trials (by sweep.metric) that take a checkpoint from the top fraction"""
    resample_probability: float = Field(0.25, ge=0, le=1)
    """chance that a perturbed value is drawn afresh from sweep.space instead of scaled by 0.8 or 1.2"""


class ObjectiveSpec(_Section):
    metric: str
    """a name of catalog.WATCHABLE (its best epoch), or params / latency_ms (measured once per trial)"""
    mode: Literal["max", "min"] = "max"

    _known_metric = named("metric", [*WATCHABLE, *TRIAL_MEASURES], "objective")


class SweepSpec(_Section):
    metric: str = "val_acc1"
    """a name of catalog.WATCHABLE"""
    mode: Literal["max", "min"] = "max"
    """whether a higher or a lower sweep.metric is better"""
    num_samples: int = Field(8, ge=1)
    """trials (search random: draws of the space, each grid kind expanded)"""
    search: str = "random"
    """random (Tune's variant generator), grid (every key's values crossed) or tpe (Optuna's TPE, the `[search]`
    extra: each trial suggested from the results so far)"""
    startup_trials: int = Field(4, ge=1)
    """search tpe: trials drawn at random before TPE models the results"""
    scheduler: Literal["asha", "pbt"] = "asha"
    """asha stops weak trials; pbt (Population Based Training) gives weak trials a strong one's checkpoint and
    perturbed values at every pbt.perturbation_interval"""
    pbt: PbtSpec = Field(default_factory=PbtSpec)
    """Population Based Training's settings (sweep.scheduler: pbt)"""
    objectives: list[ObjectiveSpec] | None = None
    """`[{metric: val_acc1, mode: max}, {metric: latency_ms, mode: min}]`: the leaderboard marks the Pareto front;
    the first is sweep.metric (what ASHA and PBT act on, what best.yaml is the best of); null: sweep.metric only"""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """trials at once; `null` = what the cluster fits"""
    asha: AshaSpec = Field(default_factory=AshaSpec)
    """ASHA's early stopping (epochs are its time unit; max_t = schedule.epochs)"""
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """`{optim.base_lr: {loguniform: [1e-4, 1e-1]}, schedule.name: {choice: [cosine, step]}}`; kinds `loguniform`, `uniform`, `randint`, `choice`, `grid`"""

    _known_metric = named("metric", WATCHABLE, "metric")
    _known_search = named("search", SEARCHES, "search")

    @model_validator(mode="after")
    def _first_objective_is_the_metric(self):
        if not self.objectives:
            return self
        first = self.objectives[0]
        if first.metric not in WATCHABLE:
            raise ValueError(f"sweep.objectives: the first is what ASHA and PBT act on every epoch, so one of "
                             f"{', '.join(WATCHABLE)} (got {first.metric})")
        if "metric" in self.model_fields_set and (self.metric, self.mode) != (first.metric, first.mode):
            raise ValueError(f"sweep.metric {self.metric} ({self.mode}) differs from the first of sweep.objectives "
                             f"({first.metric}, {first.mode}); drop sweep.metric")
        self.metric, self.mode = first.metric, first.mode
        return self

    def objective_list(self) -> list[ObjectiveSpec]:
        """Every objective, sweep.metric first."""
        return self.objectives or [ObjectiveSpec(metric=self.metric, mode=self.mode)]
