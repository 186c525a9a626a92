"""End to end with a real local Ray and a real MLflow SQLite store: the CLI runs a grid, MLflow holds one
parent and one FINISHED child per grid point with every per-layer key at every epoch; running the same
spec again resumes it without training or logging anything twice."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

SPEC = """
name: e2e
experiment: e2e-test
dataset: gaussian
data: {gaussian: {classes: 3, dim: 6, train_per_class: 30, test_per_class: 10}}
model: {mlp: {depth: 3, width: 8}}
train: {epochs: 3, batch_size: 32}
metrics: {every: 1}
checkpoint: {every: 1}
grid:
  seed: [0, 1]
  model.mlp.width: [8, 12]
resources: {cpu: 1}
"""
METRICS = [
    "nc1",
    "nc1_ratio",
    "nc2_equinorm",
    "nc2_equiangle",
    "nc2_etf",
    "cdnv",
    "ncc_acc",
    "stable_rank",
    "ncc_mismatch",
    "nc3_alignment",
]


def _run(tmp_path, uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeper",
            "run",
            str(tmp_path / "spec.yaml"),
            "--storage",
            str(tmp_path / "sweeps"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )


def _check_store(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e2e-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweeper.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert Counter(r.info.run_name for r in children) == Counter(
        f"seed={s},model.mlp.width={w}" for s in (0, 1) for w in (8, 12)
    )
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.params["model.mlp.width"] in ("8", "12")
        for key in ["test_acc", "train_acc", "train_loss", "test_loss", "epoch"] + [
            f"{m}/{split}/{tap}" for m in METRICS for split in ("train", "test") for tap in ("fc1", "fc2")
        ]:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == [1, 2, 3], (child.info.run_name, key, steps)
        # NC3 needs the classifier: only on the last tap.
        assert [m.step for m in client.get_metric_history(child.info.run_id, "nc3/train/fc2")] == [1, 2, 3]
    return client, parents[0], children


def test_cli_sweep_logs_every_layer_every_epoch_and_resumes_idempotently(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _run(tmp_path, uri)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 finished, 0 failed" in first.stdout
    assert f"mlflow ui --backend-store-uri {uri}" in first.stdout
    assert "Traceback" not in first.stderr
    _, parent, children = _check_store(uri)
    assert parent.data.metrics["trials_finished"] == 4

    second = _run(tmp_path, uri)  # same spec, same storage: resumes the finished sweep
    assert second.returncode == 0, second.stdout + second.stderr
    assert "4 finished, 0 failed" in second.stdout
    _, parent2, children2 = _check_store(uri)
    assert parent2.info.run_id == parent.info.run_id
    assert {c.info.run_id for c in children2} == {c.info.run_id for c in children}


def test_changed_spec_under_the_same_name_is_refused(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    from sweeper.orchestrate import prepare_sweep_dir
    from sweeper.spec import SpecError, load_spec

    loaded = load_spec(tmp_path / "spec.yaml")
    prepare_sweep_dir(loaded, tmp_path / "sweeps" / "e2e", "sqlite:///x.db")
    changed = load_spec(tmp_path / "spec.yaml", ["train.epochs=4"])
    with pytest.raises(SpecError, match="different spec; changed: train.epochs"):
        prepare_sweep_dir(changed, tmp_path / "sweeps" / "e2e", "sqlite:///x.db")
