"""A trial bundle in a real sweep where one member diverges: that member's trial ends FAILED with the
reason in its MLflow run, the other member finishes every epoch, and the sweep goes on."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeper.orchestrate import run_sweep
from sweeper.spec import load_spec
from tests.services import mlflow_uri

pytestmark = pytest.mark.slow

SPEC = {
    "name": "bundle-fail",
    "experiment": "bundle-fail",
    "dataset": "gaussian",
    "data": {"gaussian": {"classes": 3, "dim": 6, "train_per_class": 30, "test_per_class": 10}},
    "model": {"mlp": {"depth": 3, "width": 8, "batchnorm": False}},
    # MSE with lr 10 and momentum 0.99 overflows within an epoch (no BatchNorm to hold it back).
    "train": {"epochs": 3, "batch_size": 16, "loss": "mse"},
    "checkpoint": {"every": 1},
    "grid": {
        "cases": [{"seed": 0}, {"seed": 1, "train.optimizer.lr": 10.0, "train.optimizer.momentum": 0.99}]
    },
    "bundle": 2,
    "max_failures": 0,
    "resources": {"cpu": 1},
}


def test_a_diverging_member_fails_alone_in_a_sweep(tmp_path, local_ray):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    uri = mlflow_uri(tmp_path)
    result = run_sweep(
        load_spec(path), storage=tmp_path / "sweeps", address=None, tracking_uri=uri, progress=False
    )
    outcomes = {o.name.split(" ")[0]: o for o in result.outcomes}
    assert outcomes["seed=0"].status == "FINISHED" and outcomes["seed=0"].metrics["epoch"] == 3
    assert outcomes["seed=1"].status == "FAILED" and "TrialDiverged" in outcomes["seed=1"].error
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("bundle-fail").experiment_id])
    trials = {
        r.data.tags.get("sweeper.trial_key"): r for r in runs if r.data.tags.get("sweeper.role") == "trial"
    }
    assert len(trials) == 2
    good = next(r for r in trials.values() if r.data.params["seed"] == "0")
    bad = next(r for r in trials.values() if r.data.params["seed"] == "1")
    assert good.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(good.info.run_id, "epoch")] == [1, 2, 3]
    assert bad.info.status == "FAILED" and "training loss is" in bad.data.tags["sweeper.failure"]
    # One Tune trial: the two members trained as one bundle.
    assert len([p for p in (tmp_path / "sweeps" / "bundle-fail" / "tune").iterdir() if p.is_dir()]) == 1
