"""Running a Ray Tune `Tuner` under our control: Ctrl-C stops every trial and ends the sweep cleanly (Tune's
own handling works only on the main thread), and the leaderboard refreshes while it runs."""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.live import Live

from orchestrator.cluster.leaderboard import leaderboard, leaderboard_rows
from orchestrator.config.errors import Interrupted
from orchestrator.config.spec import JobSpec
from orchestrator.store.storage import RunFolder


class SweepInterrupted(Interrupted):
    """Ctrl-C during a sweep; the message says how to continue."""


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


def stop_all_when(interrupted: Interruption, time_attr: str, stop_at: int | None = None):
    """A Tune stopper that ends every trial once `interrupted` is set (Tune's own Ctrl-C handling
    works only when fit() runs on the main thread, and ours runs in a thread), and a trial whose
    `time_attr` reached `stop_at` (a PBT generation's end)."""
    from ray.tune import Stopper

    class StopAllWhenInterrupted(Stopper):
        def __call__(self, trial_id, result) -> bool:
            return stop_at is not None and result.get(time_attr, 0) >= stop_at

        def stop_all(self) -> bool:
            return interrupted.is_set()

    return StopAllWhenInterrupted()


STOP_WAIT_S = 60.0
"""after Ctrl-C, how long the trials get to stop before Ray is shut down under them"""


def run_tuner(tuner, interrupted: Interruption, sweep: RunFolder, spec: JobSpec, trials: list[dict], console: Console) -> None:
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
                live.update(leaderboard(leaderboard_rows(sweep, spec, trials), spec,
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


