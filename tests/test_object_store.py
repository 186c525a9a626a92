"""A sweep directory in an object store: the CLI runs, reports status and resumes a sweep whose
``--storage`` is an ``s3://`` URI on a local S3-compatible server; Tune's experiment and checkpoints, the
frozen spec and ``sweep.json`` all live in the bucket, nothing in a local ``sweeps/``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.services import s3_server

pytestmark = pytest.mark.slow

SPEC = """
name: s3sweep
experiment: s3-test
dataset: gaussian
data: {gaussian: {classes: 3, dim: 6, train_per_class: 30, test_per_class: 10}}
model: {mlp: {depth: 3, width: 8}}
train: {epochs: 2, batch_size: 32}
checkpoint: {every: 1}
grid: {seed: [0, 1]}
resources: {cpu: 1}
"""
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _cli(tmp_path, uri, *args):
    env = {**os.environ, **CREDENTIALS, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "sweeper", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )


def test_sweep_directory_on_s3_runs_and_resumes(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "spec.yaml").write_text(SPEC)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with s3_server() as endpoint:
        query = f"endpoint_override={endpoint}&scheme=http"
        storage = f"s3://sweeps/team?{query}&allow_bucket_creation=true"
        first = _cli(tmp_path, uri, "run", "spec.yaml", "--storage", storage)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "2 finished, 0 failed" in first.stdout
        assert not (tmp_path / "sweeps").exists()

        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http")
        files = {
            info.path
            for info in fs.get_file_info(pafs.FileSelector("sweeps/team/s3sweep", recursive=True))
            if info.type == pafs.FileType.File
        }
        assert {"sweeps/team/s3sweep/sweep.json", "sweeps/team/s3sweep/spec.yaml"} <= files
        assert any(p.startswith("sweeps/team/s3sweep/tune/experiment_state") for p in files), files
        checkpointed = {p.split("/")[4] for p in files if "/checkpoint_" in p}
        assert len(checkpointed) == 2 and all(t.startswith("trial_") for t in checkpointed), files
        meta = json.loads(fs.open_input_stream("sweeps/team/s3sweep/sweep.json").read())
        assert meta["tracking_uri"] == uri

        sweep_uri = f"s3://sweeps/team/s3sweep?{query}"
        status = _cli(tmp_path, uri, "status", sweep_uri, "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["counts"]["FINISHED"] == 2

        client = MlflowClient(uri)
        before = {
            r.info.run_id
            for r in client.search_runs([client.get_experiment_by_name("s3-test").experiment_id])
        }
        second = _cli(tmp_path, uri, "resume", sweep_uri)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "2 finished, 0 failed" in second.stdout
        runs = client.search_runs([client.get_experiment_by_name("s3-test").experiment_id])
        assert {r.info.run_id for r in runs} == before  # the same parent and children, none new
        for run in runs:
            assert run.info.status == "FINISHED"
            if run.data.tags.get("sweeper.role") == "trial":
                assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2]

        missing = _cli(tmp_path, uri, "status", f"s3://sweeps/team/nothing?{query}")
        assert missing.returncode == 2 and "no sweep" in missing.stderr and "Traceback" not in missing.stderr


def test_search_in_an_object_store_needs_a_database_for_optuna(tmp_path):
    """Optuna's default SQLite file cannot live in a bucket: refused before anything is written."""
    from sweeper.orchestrate import run_sweep
    from sweeper.spec import SpecError, load_spec

    spec = SPEC.replace(
        "grid: {seed: [0, 1]}",
        "search: {space: {train.optimizer.lr: {loguniform: [0.01, 0.1]}}, optuna: {trials_per_cell: 2}}",
    )
    (tmp_path / "spec.yaml").write_text(spec)
    loaded = load_spec(tmp_path / "spec.yaml")
    with pytest.raises(SpecError, match="search.optuna.storage: the sweep directory .* object store"):
        run_sweep(
            loaded,
            storage="s3://bucket/x?endpoint_override=127.0.0.1:9&scheme=http",
            address=None,
            tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        )
