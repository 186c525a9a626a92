"""Live progress of a running sweep, from what its trials already report to Tune each epoch.

Every few seconds: per running trial its epoch k/N and latest objective, the finished / failed / running /
pending counts, the best objective so far and an ETA from the epochs done, the numbers ``sweeper status``
prints. On a terminal a tqdm bar over all the sweep's epochs redraws in place with that line; when stderr
is not a terminal (CI logs, ``nohup``) the same line is printed plainly every
:data:`PLAIN_EVERY_S` seconds. Either way a trial that finishes or fails gets its own line.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass

from ray.tune import Callback

from sweeper.points import BundlePoint, point_from_dict

TERMINAL_EVERY_S = 2.0
PLAIN_EVERY_S = float(os.environ.get("SWEEPER_PROGRESS_SECONDS", "30"))
"""Seconds between plain progress lines (``$SWEEPER_PROGRESS_SECONDS``)."""


@dataclass
class _Trial:
    name: str
    epoch: int = 0
    value: float | None = None
    state: str = "RUNNING"


class ProgressPrinter(Callback):
    def __init__(self, total: int, metric: str, mode: str, epochs: int, stream=None) -> None:
        self.total = total
        self.metric = metric
        self.mode = mode
        self.epochs = epochs
        self.stream = stream if stream is not None else sys.stderr
        self.trials: dict[str, _Trial] = {}  # by trial key: a bundle's members each their own
        self._start_clock()
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if self.terminal:
            from tqdm import tqdm

            # A pseudo-terminal may report a 0 x 0 size, where tqdm hides every bar (row 0 >= 0 rows):
            # the usual size stands in (shutil falls back to it for zeros).
            size = shutil.get_terminal_size((160, 24))
            self.bar = tqdm(
                total=total * epochs,
                unit="epoch",
                file=self.stream,
                ncols=size.columns,
                nrows=size.lines,
                leave=True,
                smoothing=0.1,
            )

    def _start_clock(self) -> None:
        self.started = time.perf_counter()
        self.last_shown = 0.0
        self.counted = False  # the trials a resumed sweep had ended are counted at its first step
        self.epochs_before = 0  # and their epochs are left out of the rate the ETA assumes

    def __setstate__(self, state: dict) -> None:
        # Tune pickles its callbacks with the experiment and unpickles them on resume, in another process:
        # the old clock reading means nothing there (the resumed run's clock started at minutes).
        self.__dict__.update(state)
        self._start_clock()

    # ---- what Tune tells -----------------------------------------------------------------------------
    def on_step_begin(self, iteration, trials, **info) -> None:
        if self.counted:
            return
        self.counted = True
        for trial in trials:  # a resumed sweep's trials that ended before: their outcome, no line each
            if trial.status in ("TERMINATED", "ERROR"):
                for key, name, own in self._members(trial, trial.last_result or {}):
                    entry = self._update(key, name, own)
                    if entry.state != "FAILED":
                        entry.state = "FAILED" if trial.status == "ERROR" else "FINISHED"
        self.epochs_before = self.epochs_done()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        for key, name, own in self._members(trial, result):
            self._update(key, name, own)

    def _update(self, key: str, name: str, own: dict) -> _Trial:
        """One planned trial's entry, with what its latest result says."""
        entry = self.trials.setdefault(key, _Trial(name))
        if "epoch" in own:
            entry.epoch = int(own["epoch"])
        if isinstance(own.get(self.metric), (int, float)):
            entry.value = float(own[self.metric])
        if "error" in own:
            entry.state = "FAILED"
        return entry

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, "FAILED")

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.perf_counter()
        if now - self.last_shown >= (TERMINAL_EVERY_S if self.terminal else PLAIN_EVERY_S):
            self.last_shown = now
            self.show()

    def on_experiment_end(self, trials, **info) -> None:
        if self.bar is not None:
            self.show()
            self.bar.close()

    # ---- what it shows -------------------------------------------------------------------------------
    def summary(self) -> str:
        states = [t.state for t in self.trials.values()]
        finished, failed = states.count("FINISHED"), states.count("FAILED")
        running = [t for t in self.trials.values() if t.state == "RUNNING"]
        pending = max(0, self.total - len(self.trials))
        values = [t.value for t in self.trials.values() if t.value is not None]
        best = (max if self.mode == "max" else min)(values) if values else None
        parts = [f"{finished} finished, {failed} failed, {len(running)} running, {pending} pending"]
        if best is not None:
            parts.append(f"best {self.metric} {best:.4f}")
        if (eta := self.eta()) is not None:
            parts.append(f"ETA {_duration(eta)}")
        shown = ", ".join(
            f"{t.name} {t.epoch}/{self.epochs}" + (f" {t.value:.4f}" if t.value is not None else "")
            for t in running
        )
        return "; ".join(parts) + (f" | {shown}" if shown else "")

    def eta(self) -> float | None:
        done = self.epochs_done()
        if done == self.epochs_before:
            return None
        rate = (time.perf_counter() - self.started) / (done - self.epochs_before)
        return rate * (self.total * self.epochs - done)

    def epochs_done(self) -> int:
        # A trial that failed will not train its remaining epochs: they are done as far as waiting goes.
        return sum(self.epochs if t.state != "RUNNING" else t.epoch for t in self.trials.values())

    def show(self) -> None:
        if self.bar is not None:
            self.bar.n = min(self.epochs_done(), self.bar.total)
            self.bar.set_postfix_str(self.summary(), refresh=False)
            self.bar.refresh()
        else:
            print(
                f"[{_duration(time.perf_counter() - self.started)}] {self.summary()}",
                file=self.stream,
                flush=True,
            )

    def _end(self, trial, status: str) -> None:
        for key, name, own in self._members(trial, trial.last_result or {}):
            entry = self._update(key, name, own)
            entry.state = "FAILED" if status == "FAILED" or entry.state == "FAILED" else "FINISHED"
            value = f" {self.metric}={entry.value:.4f}" if entry.value is not None else ""
            done = sum(t.state != "RUNNING" for t in self.trials.values())
            line = (
                f"[{done}/{self.total} {time.perf_counter() - self.started:6.1f}s] "
                f"{entry.state.lower() if entry.state == 'FINISHED' else entry.state:8s} {name} epoch={entry.epoch}{value}"
            )
            if self.bar is not None:
                self.bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    @staticmethod
    def _members(trial, result: dict) -> list[tuple[str, str, dict]]:
        """``(trial key, name, its own result)`` of every planned trial in a Tune trial."""
        if "point" not in trial.config:
            return [(trial.trial_id, trial.trial_id, result)]
        point = point_from_dict(trial.config["point"])
        if isinstance(point, BundlePoint):
            return [(m.key, m.name, own) for m, own in zip(point.members, point.member_results(result))]
        return [(point.key, point.name, result)]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
