"""Stopping a sweep so that the next run continues it: Ctrl-C, SIGTERM (SLURM's time limit, ``scancel``,
a preemption) and SIGUSR1 (SLURM's ``--signal`` before the time limit, as the batch script forwards it).

On the first signal the driver writes ``checkpoints/STOP`` (sweeper.checkpoints); every running trial
sees it at the end of the epoch it is in, checkpoints that epoch (not only every ``checkpoint.every``),
reports it to Tune marked :data:`STOP_ACK`, and waits. Once every running trial has acknowledged, or
``SWEEPER_STOP_GRACE_S`` (default 120 s) has passed, the driver sets off Tune's own graceful stop (its
SIGUSR1 handler: Tune saves its experiment state one last time and ends the trials). MLflow runs stay
RUNNING, which is what ``resume`` continues. A second signal stops at once (Tune's stop without waiting
for trials; they continue from their last checkpoint). SIGKILL needs none of this (PITFALLS.md: every
state the next run reads is written whole).

Tune installs its SIGINT and SIGUSR1 handlers inside ``Tuner.fit``; :class:`GracefulStop` is a Tune
callback so that its ``setup`` (called after Tune's) can put this module's handler in front of them.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from ray import tune

from sweeper.checkpoints import STOP_MARKER
from sweeper.location import parse_location

STOP_ACK = "stop_checkpoint"
"""A trial's result key: this epoch is checkpointed because a stop was asked; the trial now waits."""
EXIT_INTERRUPTED = 75
"""``run``/``resume`` exit status of a stopped sweep that ``resume`` continues (EX_TEMPFAIL); the SLURM
batch script requeues on it."""

_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")
_reason: str | None = None  # why this process's sweep was asked to stop (None: it was not)


def stop_reason() -> str | None:
    return _reason


def grace_seconds() -> float:
    return float(os.environ.get("SWEEPER_STOP_GRACE_S", "120"))


def note_stop(reason: str) -> None:
    global _reason
    _reason = _reason or reason


def reset() -> None:
    global _reason
    _reason = None


class GracefulStop(tune.Callback):
    """Asks running trials to checkpoint, then lets Tune stop (see the module docstring)."""

    def __init__(self, checkpoints: str) -> None:
        self.checkpoints = checkpoints
        self._runtime()

    def _runtime(self) -> None:
        self._tune_handler: Any = None
        self._deadline: float | None = None
        self._acked: set[str] = set()
        self._stopping = False

    def __getstate__(self) -> dict[str, Any]:  # pickled into tuner.pkl: only what a restore needs
        return {"checkpoints": self.checkpoints}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.checkpoints = state["checkpoints"]
        self._runtime()

    def setup(self, **info: Any) -> None:
        self._runtime()
        try:
            self._tune_handler = signal.getsignal(signal.SIGUSR1)
            for name in _SIGNALS:
                signal.signal(getattr(signal, name), self._on_signal)
        except ValueError:  # not the main thread: Tune's own handling only
            self._tune_handler = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        global _reason
        name = signal.Signals(signum).name
        if _reason is not None:
            print(
                f"{name} again: stopping now; running trials continue from their last checkpoint", flush=True
            )
            self._stop_tune()
            return
        _reason = name
        self._deadline = time.monotonic() + grace_seconds()
        try:
            parse_location(self.checkpoints).write_text(STOP_MARKER, f"{name} {time.time():.0f}\n")
            print(
                f"{name}: stopping; each running trial checkpoints the epoch it is in "
                f"(at most {grace_seconds():.0f} s; {name if name != 'SIGINT' else 'Ctrl-C'} again stops now)",
                flush=True,
            )
        except OSError as err:  # storage away: stop as Tune does, from the last regular checkpoints
            print(
                f"{name}: cannot ask trials to checkpoint ({err}); stopping now", file=sys.stderr, flush=True
            )
            self._stop_tune()

    def _stop_tune(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if callable(self._tune_handler):
            self._tune_handler(signal.SIGUSR1, None)
        else:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(STOP_ACK):
            self._acked.add(trial.trial_id)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if _reason is None or self._stopping:
            return
        running = [t for t in trials if t.status == "RUNNING"]
        if all(t.trial_id in self._acked for t in running) or time.monotonic() > (self._deadline or 0):
            self._stop_tune()


def clear_stop_marker(checkpoints: str) -> None:
    """Before a run starts its trials: a marker left by the run before would stop them at once."""
    location = parse_location(checkpoints)
    if location.exists(STOP_MARKER):
        location.remove(STOP_MARKER)


def hold_after_stop_checkpoint() -> None:
    """A trial that checkpointed for a stop waits for Tune to end it, training nothing more (an epoch
    trained now would be trained again by the next run). Bounded: a driver that never ends it lets the
    trial go on training after the grace period and a margin."""
    time.sleep(grace_seconds() + 60)
