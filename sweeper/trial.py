"""The Ray Tune function trainable: runs :func:`trainables.loop.train` with MLflow and Tune checkpoints.

Tune may run this function again for a trial that already ran (restore replays work, retries after a
failure): it continues from Tune's checkpoint when there is one, logs to MLflow only the epochs its child
run does not hold yet, and does not train a trial whose child run already FINISHED.
"""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path
from typing import Any

import ray
from ray import tune

from sweeper.report import TAG_TAPS
from sweeper.tracking import TAG_CELL, TAG_ORDER, TAG_SPEC_HASH, TrialTracker, with_retry
from trainables.checkpoint import STATE_FILE, load_state, save_state
from trainables.config import TrialConfig
from trainables.loop import train

TAG_NODE = "sweeper.node"


def tune_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The run-level subset Tune keeps in its experiment state; per-layer keys go to MLflow only."""
    return {k: float(v) for k, v in metrics.items() if "/" not in k}


class TuneReporter:
    def __init__(self, tracker: TrialTracker) -> None:
        self.tracker = tracker

    def report(self, epoch: int, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        # MLflow first and synchronously: once Tune holds a checkpoint past this epoch, the epoch is logged.
        self.tracker.log_epoch(epoch, metrics)
        result = {"epoch": epoch, **tune_metrics(metrics)}
        if state is None:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory(prefix="sweeper-ckpt-") as tmp:
            save_state(state, Path(tmp) / STATE_FILE)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))


def run_trial(params: dict[str, Any]) -> None:
    """Tune entry point. ``params["point"]``: ``trial`` (a TrialConfig dict), ``key``, ``name``, ``cell``;
    ``params["sweep"]``: tracking URI, experiment and parent run ids, sweep id, spec hash."""
    point, sweep = params["point"], params["sweep"]
    cfg = TrialConfig.model_validate(point["trial"])
    if cfg.data.root is None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": point["data_root"]})})
    taps = tap_names(cfg)
    tracker = TrialTracker(
        tracking_uri=sweep["tracking_uri"],
        experiment_id=sweep["experiment_id"],
        parent_run_id=sweep["parent_run_id"],
        sweep_id=sweep["sweep_id"],
        trial_key=point["key"],
        run_name=point["name"],
        params=point["trial"],
        tags={
            TAG_CELL: point["cell"],
            TAG_SPEC_HASH: sweep["spec_hash"],
            TAG_TAPS: ",".join(taps),
            TAG_ORDER: point["order"],
            **point.get("tags", {}),
        },
    )
    # Where the trial runs now (a retried trial may move to another node).
    with_retry(tracker.client.set_tag, tracker.run_id, TAG_NODE, ray.get_runtime_context().get_node_id())
    if tracker.finished:
        # Replayed after the trial had already ended (PITFALLS.md 1): report its final result, train nothing.
        final = tracker.latest_metrics()
        tune.report({"epoch": tracker.last_epoch, **tune_metrics(final)})
        return
    checkpoint = tune.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(Path(directory) / STATE_FILE)
    if state is not None:
        # Evidence that a retried or resumed trial continued from its checkpoint, not from scratch.
        restored = int(state["epoch"])
        with_retry(tracker.client.log_metric, tracker.run_id, "restored_from_epoch", restored, step=restored)
    try:
        summary = train(cfg, TuneReporter(tracker), state)
    except Exception as err:
        tracker.fail(f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}")
        raise
    log_trial_figures(tracker, taps, point["name"])
    tracker.finish(summary)


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
    from sweeper.report import history_of

    keys = [f"{m}/train/{t}" for m in ("ncc_acc", "nc1") for t in taps]
    history = with_retry(history_of, tracker.client, tracker.run_id, keys)
    with_retry(
        tracker.client.log_figure,
        tracker.run_id,
        figures.ncc_over_epochs({name: history}, taps),
        "figures/ncc_acc_by_epoch.png",
    )
    with_retry(
        tracker.client.log_figure,
        tracker.run_id,
        figures.nc1_heatmap(history, taps, name),
        "figures/nc1_heatmap.png",
    )
