"""The trial's MLflow child run: found again by tags, never created twice (a real SQLite store)."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from sweeper.tracking import TAG_SWEEP, TAG_TRIAL, TrialTracker
from tests.services import mlflow_uri


def _tracker(uri: str, experiment_id: str) -> TrialTracker:
    return TrialTracker(
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id="parent",
        sweep_id="s1",
        trial_key="t1",
        run_name="trial 1",
        params={"seed": 1, "train": {"lr": 0.1}},
        tags={},
    )


def test_a_create_sent_twice_by_a_retry_leaves_one_run(tmp_path, monkeypatch):
    """A create the server committed but whose answer was lost is sent again by the retry (seen as a fifth
    child run for four trials after a tracking-server restart): the trial keeps the earliest run only."""
    uri = mlflow_uri(tmp_path)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("tracking")
    create = MlflowClient.create_run

    def committed_twice(self, *args, **kwargs):
        create(self, *args, **kwargs)  # the first answer was lost ...
        time.sleep(0.01)
        return create(self, *args, **kwargs)  # ... and the retry created again

    monkeypatch.setattr(MlflowClient, "create_run", committed_twice)
    tracker = _tracker(uri, experiment_id)
    runs = client.search_runs([experiment_id], f"tags.`{TAG_SWEEP}` = 's1' and tags.`{TAG_TRIAL}` = 't1'")
    assert [r.info.run_id for r in runs] == [tracker.run_id]
    assert runs[0].data.params == {"seed": "1", "train.lr": "0.1"}

    monkeypatch.setattr(MlflowClient, "create_run", create)
    tracker.log_epoch(1, {"acc": 0.5})
    again = _tracker(uri, experiment_id)  # a replayed trial finds the same run and where it stopped
    assert again.run_id == tracker.run_id and again.last_epoch == 1
    assert len(client.search_runs([experiment_id])) == 1
