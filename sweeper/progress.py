"""Compact live progress: one line when a trial starts over, finishes or fails, never per-epoch spam."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from sweeper.points import BundlePoint, point_from_dict


class ProgressPrinter(Callback):
    def __init__(self, total: int, metric: str) -> None:
        self.total = total
        self.metric = metric
        self.done = 0
        self.started = time.perf_counter()

    def _line(self, trial, status: str) -> None:
        point = point_from_dict(trial.config["point"]) if "point" in trial.config else None
        # Counts trials: a bundle is several.
        self.done += len(point.members) if isinstance(point, BundlePoint) else 1
        name = point.name if point is not None else trial.trial_id
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{self.metric}={value:.4f}" if isinstance(value, (int, float)) else ""
        elapsed = time.perf_counter() - self.started
        print(
            f"[{self.done}/{self.total} {elapsed:6.1f}s] {status:8s} {name} "
            f"epoch={result.get('epoch', 0)} {shown}",
            file=sys.stderr,
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, "FAILED")
