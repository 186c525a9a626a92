"""The trial's MLflow child run: found again by tags, never created twice (a real SQLite store)."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient

from sweeper.tracking import TAG_SWEEP, TAG_TRIAL, TrialTracker
from tests.services import mlflow_uri


def _tracker(uri: str, experiment_id: str, key: str = "t1") -> TrialTracker:
    return TrialTracker(
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id="parent",
        sweep_id="s1",
        trial_key=key,
        run_name=f"trial {key}",
        params={"seed": 1, "train": {"lr": 0.1}},
        tags={},
    )


def test_a_create_sent_twice_by_a_retry_leaves_one_run(tmp_path, monkeypatch):
    """A create the server committed but whose answer was lost is sent again by the retry (seen as a fifth
    child run for four trials after a tracking-server restart): the trial keeps the earliest run only."""
    uri = mlflow_uri(tmp_path)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("tracking", artifact_location=(tmp_path / "artifacts").as_uri())
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


def test_background_epochs_are_stored_once_even_when_the_background_attempt_fails(tmp_path, monkeypatch):
    """Bundle members send their epochs in the background (MLflow's asynchronous ``log_batch``) and
    ``flush`` returns once each is stored. A background attempt that fails (the tracking server went
    away) is sent again by the retrying path, and the epoch is stored once (a real SQLite store)."""
    log_batch = SqlAlchemyStore.log_batch
    background = []  # one entry per log_batch made off the main thread
    outage = threading.Event()

    def store_log_batch(self, run_id, metrics=(), params=(), tags=()):
        if threading.current_thread() is not threading.main_thread():
            background.append(run_id)
            if outage.is_set():
                raise MlflowException("API request to /runs/log-batch failed: connection refused")
        return log_batch(self, run_id, metrics, params, tags)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", store_log_batch)
    uri = mlflow_uri(tmp_path)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(
        "background", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    trackers = [_tracker(uri, experiment_id, f"t{i}") for i in range(3)]
    assert not any(t.remote for t in trackers)  # a local store: bundles log in sequence there
    for epoch in (1, 2):
        for i, tracker in enumerate(trackers):
            assert tracker.log_epoch(epoch, {"acc": epoch / 10 + i}, wait=False)
        for tracker in trackers:
            tracker.flush()
    assert len(background) == 6
    outage.set()
    for tracker in trackers:
        tracker.log_epoch(3, {"acc": 0.3}, wait=False)
    for tracker in trackers:
        tracker.flush()
    assert len(background) == 9  # epoch 3 was tried in the background, then stored by the retry
    for i, tracker in enumerate(trackers):
        steps = [m.step for m in client.get_metric_history(tracker.run_id, "epoch")]
        assert sorted(steps) == [1, 2, 3], (i, steps)
        acc = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "acc")}
        assert acc == pytest.approx({1: 0.1 + i, 2: 0.2 + i, 3: 0.3})


def test_experiments_keep_artifacts_beside_their_store_and_open_in_training_mode(tmp_path, monkeypatch):
    """MLflow's default puts a database store's artifacts in ./mlruns of the working directory: a sweep
    run from another folder wrote its figures there. The sweeper's experiments keep them beside the
    store, and carry the experiment-kind tag the UI needs to show training runs (an untagged experiment
    is adopted, a user's own kind is kept)."""
    from sweeper.tracking import EXPERIMENT_KIND, artifact_location, ensure_experiment, ensure_parent_run

    (tmp_path / "store").mkdir()
    uri = mlflow_uri(tmp_path / "store")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    client = MlflowClient(uri)
    common = dict(
        sweep_name="s", spec_hash="h", spec_text="name: s\n", sweep_dir=str(tmp_path / "sweeps" / "s")
    )
    experiment_id = ensure_experiment(client, "fresh", common["sweep_dir"])
    run_id = ensure_parent_run(client, experiment_id=experiment_id, sweep_id="a", **common)
    experiment = client.get_experiment(experiment_id)
    assert experiment.artifact_location == (tmp_path / "store" / "mlartifacts" / "fresh").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    client.log_text(run_id, "figure", "figures/f.txt")
    assert list(elsewhere.iterdir()) == []
    assert (tmp_path / "store" / "mlartifacts" / "fresh" / run_id / "artifacts" / "spec.yaml").exists()

    untagged = client.create_experiment("untagged")
    assert ensure_experiment(client, "untagged", common["sweep_dir"]) == untagged
    assert (
        client.get_experiment(untagged).tags["mlflow.experimentKind"]
        == EXPERIMENT_KIND["mlflow.experimentKind"]
    )
    own = client.create_experiment("own", tags={"mlflow.experimentKind": "genai_development"})
    assert ensure_experiment(client, "own", common["sweep_dir"]) == own
    assert client.get_experiment(own).tags["mlflow.experimentKind"] == "genai_development"

    # Other stores: a server keeps its own; another database puts them beside the sweep directories.
    pg = "postgresql://u@127.0.0.1/db"
    assert artifact_location("http://127.0.0.1:5000", "/x/sweeps/s", "e") is None
    assert artifact_location(pg, "/x/sweeps/s", "a b/c") == "file:///x/sweeps/mlartifacts/a_b_c"
    assert artifact_location(pg, "s3://b/sweeps/s", "e") == "s3://b/sweeps/mlartifacts/e"
