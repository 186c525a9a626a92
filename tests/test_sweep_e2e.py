"""End to end with a real local Ray and a real MLflow SQLite store: the CLI runs a grid, MLflow holds one
parent and one FINISHED child per grid point with every per-layer key at every epoch; running the same
spec again resumes it without training or logging anything twice."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One real sweep through the CLI, shared by the tests below (Ray start-up dominates their cost)."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    (tmp_path / "spec.yaml").write_text(SPEC)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _run(tmp_path, uri)
    assert first.returncode == 0, first.stdout + first.stderr
    return tmp_path, uri, first


def test_cli_sweep_logs_every_layer_every_epoch(sweep):
    _, uri, first = sweep
    assert "4 finished, 0 failed" in first.stdout
    assert f"mlflow ui --backend-store-uri {uri}" in first.stdout
    assert "Traceback" not in first.stderr
    client, parent, children = _check_store(uri)
    assert parent.data.metrics["trials_finished"] == 4
    for child in children:
        # Each trial logs its own figures, so the MLflow UI shows them without `sweeper report`.
        listed = {a.path for a in client.list_artifacts(child.info.run_id, "figures")}
        assert listed == {"figures/ncc_acc_by_epoch.png", "figures/nc1_heatmap.png"}


def test_report_table_equals_mlflow_and_figures_are_images(sweep):
    import json

    import matplotlib.image

    tmp_path, uri, _ = sweep
    for fmt in ("md", "csv", "json"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sweeper",
                "report",
                "e2e",
                "--storage",
                str(tmp_path / "sweeps"),
                "--format",
                fmt,
                "--out",
                str(tmp_path / "report"),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "report" / f"results.{fmt}").stat().st_size > 0
    rows = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["variant"] for r in rows] == ["model.mlp.width=8", "model.mlp.width=12"]
    client, parent, children = _check_store(uri)
    for row in rows:
        members = [c for c in children if c.data.tags["sweeper.cell"] == row["variant"]]
        assert row["n"] == len(members) == 2
        test = [
            [
                m.value
                for m in sorted(client.get_metric_history(c.info.run_id, "test_acc"), key=lambda m: m.step)
            ]
            for c in members
        ]
        assert row["test_acc_at_end"] == pytest.approx(sum(t[-1] for t in test) / 2)
        assert row["best_test_acc"] == pytest.approx(sum(max(t) for t in test) / 2)
        assert row["trainable_params"] == members[0].data.metrics["final/trainable_params"]
    pngs = sorted((tmp_path / "report").rglob("*.png"))
    assert {p.name for p in pngs} >= {
        "ncc_acc_by_epoch.png",
        "ncc_mismatch_by_layer.png",
        "collapse_by_layer.png",
    }
    assert len([p for p in pngs if p.parent.name == "nc1_heatmaps"]) == 4
    for png in pngs:
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/results.json" in logged and "report/ncc_acc_by_epoch.png" in logged


def test_running_again_resumes_without_training_or_logging_twice(sweep):
    tmp_path, uri, _ = sweep
    _, parent, children = _check_store(uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    status = subprocess.run(
        [sys.executable, "-m", "sweeper", "status", "e2e", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["counts"]["FINISHED"] == 4 and state["planned"] == 4
    assert all(t["epoch"] == 3 for t in state["trials"])
    # `resume` takes the frozen spec from the sweep directory; the finished sweep trains nothing again.
    second = subprocess.run(
        [sys.executable, "-m", "sweeper", "resume", "e2e"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "4 finished, 0 failed" in second.stdout
    _, parent2, children2 = _check_store(uri)
    assert parent2.info.run_id == parent.info.run_id
    assert {c.info.run_id for c in children2} == {c.info.run_id for c in children}


def test_changed_spec_under_the_same_name_is_refused(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    from sweeper.location import parse_location
    from sweeper.orchestrate import prepare_sweep_dir
    from sweeper.spec import SpecError, load_spec

    loaded = load_spec(tmp_path / "spec.yaml")
    sweep_dir = parse_location(tmp_path / "sweeps" / "e2e")
    prepare_sweep_dir(loaded, sweep_dir, "sqlite:///x.db")
    changed = load_spec(tmp_path / "spec.yaml", ["train.epochs=4"])
    with pytest.raises(SpecError, match="different spec; changed: train.epochs"):
        prepare_sweep_dir(changed, sweep_dir, "sqlite:///x.db")
