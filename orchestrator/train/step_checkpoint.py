"""The mid-epoch checkpoint (run.checkpoint_every_steps): a step callback that writes `checkpoint_step/`
with every rank's RNG state, so a killed run resumes at the next step. Imports no Ray."""

from __future__ import annotations

import time

from orchestrator.store.storage import STEP_CHECKPOINT
from orchestrator.train import checkpoint as ckpt
from orchestrator.train.loop import Tally, Trainee
from orchestrator.train.run import Run


def mid_epoch_saver(run: Run, trainee: Trainee, first_step: int, tally: Tally):
    """A step callback (every rank) that writes the run folder's mid-epoch checkpoint every
    run.checkpoint_every_steps optimizer steps (not at an epoch's end: the epoch checkpoint is that), or None."""
    every = run.spec.run.checkpoint_every_steps
    if every is None:
        return None
    started = time.perf_counter()
    carried_s = tally.seconds

    def save(step: int) -> None:
        done = step + 1
        if done % every or done - first_step >= run.plan.steps_per_epoch:
            return
        rng_by_rank = gather([ckpt.rng_state()], run.env.world_size)
        if run.env.rank != 0:
            return
        run.state.step = done
        mid = {"epoch_steps": done - first_step, "rng_by_rank": rng_by_rank,
               "tally": {**tally.to_dict(), "seconds": carried_s + time.perf_counter() - started},
               "wall_s": run.state.wall_s + time.perf_counter() - run.started}
        run.folder.write_bytes(STEP_CHECKPOINT, ckpt.encode(trainee, run.state, run.spec, run.plan, mid))

    return save


def gather(values: list, world_size: int) -> list:
    """Every rank's `values[0]`, in rank order (a collective when distributed)."""
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return values
    everyone = [None] * world_size
    dist.all_gather_object(everyone, values[0])
    return everyone
