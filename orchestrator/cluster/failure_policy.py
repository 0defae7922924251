"""Which failures of a Ray Train run are retried: not the job's own errors.

`FinalErrorsPolicy` is Ray's default failure policy, except that an error of the job, its data or its
weights (a `config.errors.JobError`: a retry gives the same error) is raised at once; other failures get
`run.max_failures` restarts. Ray 2.60 has no public hook for this: `worker.Trainer` hands the policy
to the Train controller through a private method; where that Ray internal is missing it is None
(a plain TorchTrainer, retries included). `worker_error(exc)` finds the worker's own exception in
Ray's error, for the driver to show as one line.

This module imports neither torch nor the training code: the controller unpickles the policy when it
starts, and every import here would delay each run's worker group by its seconds (torch and
torchvision take ~3 s here). The errors' torch-free base classes are all it needs.
"""

from __future__ import annotations

from orchestrator.config.errors import JobError

try:   # Ray internals: see the module docstring
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
except ImportError:  # pragma: no cover - another Ray version
    DefaultFailurePolicy = None


def worker_error(exc: BaseException) -> BaseException | None:
    """A worker's own exception inside Ray's WorkerGroupError when it is one of ours: the lowest rank's
    JobError, else the lowest rank's StorageError, else None."""
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return None
    from orchestrator.store.storage import StorageError  # pyarrow: only once a run has failed

    for kinds in (JobError, StorageError):
        ours = [failures[rank] for rank in sorted(failures) if isinstance(failures[rank], kinds)]
        if ours:
            return ours[0]
    return None


if DefaultFailurePolicy is not None:
    class FinalErrorsPolicy(DefaultFailurePolicy):
        """Ray's default policy, except that an error of the job, data or weights is raised at once."""

        def make_decision(self, training_failed_error):
            if isinstance(worker_error(training_failed_error), JobError):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)
else:  # pragma: no cover
    FinalErrorsPolicy = None
