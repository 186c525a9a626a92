"""The Ray Tune function trainable: runs :func:`trainables.loop.train` with MLflow and Tune checkpoints.

Tune may run this function again for a trial that already ran (restore replays work, retries after a
failure): it continues from Tune's checkpoint when there is one, logs to MLflow only the epochs its child
run does not hold yet, and does not train a trial whose child run already FINISHED.
"""

from __future__ import annotations

import functools
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from sweeper.checkpoints import StopProbe, TrialCheckpoint
from sweeper.graceful import STOP_ACK, hold_after_stop_checkpoint
from sweeper.points import BundlePoint, SweepContext, TrialPoint, point_from_dict
from sweeper.tracking import (
    TAG_CELL,
    TAG_NODE,
    TAG_ORDER,
    TAG_SPEC_HASH,
    TAG_TAPS,
    TrialTracker,
    history_of,
    with_retry,
)
from trainables.checkpoint import STATE_NAME, load_state, save_state
from trainables.config import TrialConfig
from trainables.data import describe_splits
from trainables.loop import Trainer


def tune_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The run-level subset Tune keeps in its experiment state; per-layer keys go to MLflow only."""
    return {k: float(v) for k, v in metrics.items() if "/" not in k}


class Checkpoints:
    """A Tune trial's saved states by name (``trial_state`` for a lone trial, the member's trial key in a
    bundle): the sweeper's own file (sweeper.checkpoints), or Tune's checkpoints for a sweep started before
    it had one (its context has no ``checkpoints``), read so that resuming it loses nothing."""

    def __init__(self, key: str, sweep: SweepContext) -> None:
        self.own = TrialCheckpoint(sweep.checkpoints, key) if sweep.checkpoints else None
        self.stop = StopProbe(sweep.checkpoints)  # the trainer asks it once per epoch

    def load(self) -> dict[str, dict[str, Any]]:
        if self.own is not None:
            states = self.own.load()
            if states is not None:
                return states
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return {}
        with checkpoint.as_directory() as directory:
            return {path.stem: load_state(path) for path in Path(directory).glob("*.pt")}

    def report(self, result: dict[str, Any], states: dict[str, dict[str, Any]]) -> None:
        """Save ``states`` (if any), then report ``result`` to Tune: the checkpoint is complete before Tune
        counts the epoch done. A checkpoint taken because the sweep is stopping says so to the driver
        (sweeper.graceful), and the trial then trains no further epoch."""
        if not states:
            tune.report(result)
        elif self.own is not None:
            self.own.save(states)
            if self.stop.seen:
                tune.report({**result, STOP_ACK: 1.0})
                hold_after_stop_checkpoint()
            else:
                tune.report(result)
        else:
            with tempfile.TemporaryDirectory(prefix="sweeper-ckpt-") as tmp:
                for name, state in states.items():
                    save_state(state, Path(tmp) / f"{name}.pt")
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))


class TuneReporter:
    def __init__(self, tracker: TrialTracker, checkpoints: Checkpoints) -> None:
        self.tracker = tracker
        self.checkpoints = checkpoints
        self.reported = False

    def report(self, epoch: int, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        # MLflow first and synchronously: once a checkpoint past this epoch exists, the epoch is logged.
        self.reported = True
        self.tracker.log_epoch(epoch, metrics)
        result = {"epoch": epoch, **tune_metrics(metrics)}
        self.checkpoints.report(result, {} if state is None else {STATE_NAME: state})


def _config(point: TrialPoint) -> TrialConfig:
    cfg = TrialConfig.model_validate(point.trial)
    if cfg.data.root is None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": point.data_root})})
    return cfg


def _tracker(point: TrialPoint, sweep: SweepContext, taps: list[str]) -> TrialTracker:
    tracker = TrialTracker(
        tracking_uri=sweep.tracking_uri,
        experiment_id=sweep.experiment_id,
        parent_run_id=sweep.parent_run_id,
        sweep_id=sweep.sweep_id,
        trial_key=point.key,
        run_name=point.name,
        params=point.trial,
        tags={
            TAG_CELL: point.cell,
            TAG_SPEC_HASH: sweep.spec_hash,
            TAG_TAPS: ",".join(taps),
            TAG_ORDER: point.order,
            **point.tags,
        },
    )
    # Where the trial runs now (a retried trial may move): the host, and which of its Ray nodes.
    node = f"{socket.gethostname()} (Ray node {ray.get_runtime_context().get_node_id()[:8]})"
    with_retry(tracker.client.set_tag, tracker.run_id, TAG_NODE, node)
    return tracker


def _mark_restored(tracker: TrialTracker, state: dict[str, Any]) -> None:
    # Evidence that a retried or resumed trial continued from its checkpoint, not from scratch.
    restored = int(state["epoch"])
    with_retry(tracker.client.log_metric, tracker.run_id, "restored_from_epoch", restored, step=restored)


def run_trial(params: dict[str, Any]) -> None:
    """Tune entry point. ``params``: ``point`` (a :class:`TrialPoint` or :class:`BundlePoint` as a dict)
    and ``sweep`` (a :class:`SweepContext` as a dict)."""
    point, sweep = point_from_dict(params["point"]), SweepContext.from_dict(params["sweep"])
    if sweep.threads is not None:  # sweeps started before it ran with Ray's default (one thread)
        torch.set_num_threads(sweep.threads)
    if isinstance(point, BundlePoint):
        run_bundle(point, sweep)
        return
    cfg = _config(point)
    taps = tap_names(cfg)
    tracker = _tracker(point, sweep, taps)
    if tracker.finished:
        # Replayed after the trial had ended (Tune's snapshot predates its end): report its result, train nothing.
        final = tracker.latest_metrics()
        tune.report({"epoch": tracker.last_epoch, **tune_metrics(final)})
        return
    checkpoints = Checkpoints(point.key, sweep)
    state = checkpoints.load().get(STATE_NAME)
    if state is not None:
        _mark_restored(tracker, state)
    reporter = TuneReporter(tracker, checkpoints)
    try:
        trainer = Trainer(cfg)
        trainer.stop_requested = checkpoints.stop
        if state is not None:
            trainer.load_state_dict(state)
        tracker.log_dataset(lambda: describe_splits(cfg, trainer.data))
        summary = trainer.run(reporter)
    except Exception as err:
        tracker.fail(f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}")
        raise
    if not reporter.reported:
        # Resumed from the last epoch's checkpoint (the driver died before the run was marked FINISHED):
        # nothing was left to train, and Tune and the searcher still need the final result.
        tune.report({"epoch": tracker.last_epoch, **tune_metrics(tracker.latest_metrics())})
    log_trial_figures(tracker, taps, point.name)
    tracker.finish(summary)


class BundleReporter:
    """Each member logs its own epochs to its own MLflow run (concurrently when the runs live on a tracking
    server); once every member's epoch is logged, the bundle reports to Tune once, with every member's
    checkpoint slice (``<trial key>.pt``) together."""

    def __init__(
        self, members: tuple[TrialPoint, ...], trackers: list[TrialTracker], checkpoints: Checkpoints
    ) -> None:
        self.members = members
        self.trackers = trackers
        self.checkpoints = checkpoints
        self.latest: dict[int, dict[str, float]] = {}
        self.states: dict[int, dict[str, Any]] = {}
        self.failed: dict[int, str] = {}

    def member(self, index: int) -> Any:
        outer = self

        class _Member:
            def report(self, epoch: int, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
                tracker = outer.trackers[index]
                tracker.log_epoch(epoch, metrics, wait=not tracker.remote)
                outer.latest[index] = {"epoch": epoch, **tune_metrics(metrics)}
                if state is not None:
                    outer.states[index] = state

        return _Member()

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": max((m["epoch"] for m in self.latest.values()), default=0)}
        for i, metrics in self.latest.items():
            out.update({BundlePoint.member_prefix(i) + k: v for k, v in metrics.items()})
        for i, reason in self.failed.items():
            out[BundlePoint.member_prefix(i) + "error"] = reason
        return out

    def mark_failures(self, failed: dict[int, Exception]) -> None:
        """Members that failed this epoch end FAILED in MLflow now, with the reason, not at the end."""
        for i, err in failed.items():
            if i not in self.failed:
                self.failed[i] = f"{type(err).__name__}: {err}"
                self.trackers[i].fail(self.failed[i])

    def epoch_done(self, epoch: int) -> None:
        for tracker in self.trackers:  # MLflow first: the checkpoint must not run ahead of the runs
            tracker.flush()
        self.checkpoints.report(self.result(), {self.members[i].key: s for i, s in self.states.items()})
        self.states = {}


def run_bundle(point: BundlePoint, sweep: SweepContext) -> None:
    """Train a trial bundle (trainables.bundle): one Tune trial, one MLflow child run per member.

    Members whose run already FINISHED are not trained again; the others continue from their slices of
    the bundle's checkpoint. A member missing from a checkpoint that holds the others had failed before
    it (it diverged): it stays failed rather than restart alone at epoch 0."""
    from trainables.bundle import Bundle

    members = point.members
    cfgs = [_config(m) for m in members]
    taps = tap_names(cfgs[0])
    trackers = [_tracker(m, sweep, taps) for m in members]
    checkpoints = Checkpoints(point.key, sweep)
    reporter = BundleReporter(members, trackers, checkpoints)
    saved = checkpoints.load()
    states = {i: saved[m.key] for i, m in enumerate(members) if m.key in saved}
    active = []
    for i, tracker in enumerate(trackers):
        if tracker.finished:
            reporter.latest[i] = {"epoch": tracker.last_epoch, **tune_metrics(tracker.latest_metrics())}
        elif states and i not in states:
            reason = "failed earlier in its bundle (not in the bundle's checkpoint); see its earlier epochs"
            tracker.fail(reason)
            reporter.failed[i] = reason
        else:
            active.append(i)
    if not active:
        tune.report(reporter.result())
        return
    for i in active:
        if i in states:
            _mark_restored(trackers[i], states[i])
    try:
        bundle = Bundle([cfgs[i] for i in active], [states.get(i) for i in active])
        bundle.stop_requested = checkpoints.stop
        dataset = functools.cache(lambda: describe_splits(cfgs[0], bundle.data))  # members share the data
        for i in active:
            trackers[i].log_dataset(dataset)

        def epoch_done(epoch: int) -> None:
            reporter.mark_failures({active[j]: err for j, err in bundle.failed.items()})
            reporter.epoch_done(epoch)

        results = bundle.run([reporter.member(i) for i in active], epoch_done=epoch_done)
    except Exception as err:  # the whole bundle: Tune retries it from its checkpoint
        for i in active:
            trackers[i].fail(f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}")
        raise
    reporter.mark_failures({i: r for i, r in zip(active, results) if isinstance(r, Exception)})
    for i in active:
        if i not in reporter.latest and i not in reporter.failed:
            # Resumed from the last epoch's checkpoint: nothing to train, the final result is in MLflow.
            tracker = trackers[i]
            reporter.latest[i] = {"epoch": tracker.last_epoch, **tune_metrics(tracker.latest_metrics())}
    for i, outcome in zip(active, results):
        if not isinstance(outcome, Exception):
            log_trial_figures(trackers[i], taps, members[i].name)
            trackers[i].finish(outcome)
    if len(reporter.failed) == len(members):
        raise RuntimeError("every member of the bundle failed: " + "; ".join(reporter.failed.values()))
    tune.report(reporter.result())  # the final word, with failures of the last epoch


def tap_names(cfg: TrialConfig) -> list[str]:
    import torch

    from trainables.data import dataset_info
    from trainables.models import build_model

    with torch.device("meta"):
        return build_model(cfg, dataset_info(cfg)).tap_names


def log_trial_figures(tracker: TrialTracker, taps: list[str], name: str) -> None:
    """The trial's own figures, so the MLflow UI shows them without ``sweeper report``: NCC accuracy per
    layer over epochs (000 Fig. 1) and the layer x epoch NC1 heatmap."""
    from sweeper import figures

    keys = [f"{m}/train/{t}" for m in ("ncc_acc", "nc1") for t in taps]
    history = with_retry(history_of, tracker.client, tracker.run_id, keys)
    with_retry(
        tracker.client.log_figure,
        tracker.run_id,
        figures.ncc_over_epochs({name: history}, {name: taps}),
        "figures/ncc_acc_by_epoch.png",
    )
    with_retry(
        tracker.client.log_figure,
        tracker.run_id,
        figures.nc1_heatmap(history, taps, name),
        "figures/nc1_heatmap.png",
    )
