"""A sweep's histories as ``sweeper.results`` reads them, checked against MLflow's own per-key client; used
wherever a test has run a real sweep (plain, pooled, killed and resumed, searched, on S3)."""

from __future__ import annotations

import math

import pandas as pd
from mlflow.tracking import MlflowClient

from sweeper.results import EVENTS, HEADLINE, load_histories, load_trials, open_sweeps
from sweeper.tracking import SENTINEL


def mlflow_histories(client: MlflowClient, run, keys=None) -> dict[tuple[str, int], float]:
    """A run's histories as MLflow's own per-key client gives them: complete epochs only (the sentinel's
    steps), every step once (a step stored twice must not exist: it would be a doubled epoch)."""
    complete = {m.step for m in client.get_metric_history(run.info.run_id, SENTINEL)}
    out = {}
    for key in keys or run.data.metrics:
        if key in HEADLINE or key in EVENTS or key == SENTINEL:
            continue
        points = [m for m in client.get_metric_history(run.info.run_id, key) if m.step in complete]
        steps = [m.step for m in points]
        assert len(steps) == len(set(steps)), (run.info.run_name, key, sorted(steps))
        out.update({(key, m.step): m.value for m in points})
    return out


def assert_histories_match_mlflow(sweep, storage) -> pd.DataFrame:
    """Every trial of the sweep in ``load_histories`` exactly as MLflow's per-key histories hold it, and
    each trial once in ``load_trials``."""
    trials = load_trials(sweep, storage)
    frame = load_histories(sweep, storage)
    assert trials["trial"].is_unique and not trials.empty
    client = MlflowClient(open_sweeps(sweep, storage)[0].meta["tracking_uri"])
    for row in trials.itertuples():
        expected = mlflow_histories(client, client.get_run(row.run_id))
        mine = frame[frame["run_id"] == row.run_id]
        got = dict(zip(zip(mine["key"].astype(str), mine["epoch"]), mine["value"], strict=True))
        assert got.keys() == expected.keys(), (row.run_name, set(got) ^ set(expected))
        for point, value in expected.items():
            assert got[point] == value or (math.isnan(value) and math.isnan(got[point])), point
    return frame
