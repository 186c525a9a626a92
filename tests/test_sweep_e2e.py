"""End to end with a real local Ray and a real MLflow SQLite store: the CLI runs a grid, MLflow holds one
parent and one FINISHED child per grid point with every per-layer key at every epoch; running the same
spec again resumes it without training or logging anything twice.

The sweep exercises the optional paths together, so one Ray run covers them: the grid's two seeds of each
width train as one trial bundle (``bundle: 2``), and the sweep directory is an ``s3://`` URI on a local
S3-compatible server (``moto_server`` over HTTP): the frozen spec, ``sweep.json``, Tune's experiment and
every checkpoint live in the bucket, and ``status``/``report``/``resume`` read them from there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.histories import assert_histories_match_mlflow
from tests.services import mlflow_uri, s3_server

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
bundle: 2
reference:
  - source: a made-up paper, Table 9
    match: {model.mlp.width: 8}
    values: {best_test_acc: 50.0}
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


CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _cli(tmp_path, uri, *args, timeout=600):
    env = {**os.environ, **CREDENTIALS, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "sweeper", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=timeout,
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
        f"seed={s} width={w}" for s in (0, 1) for w in (8, 12)
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
    uri = mlflow_uri(tmp_path)
    with s3_server() as endpoint:
        query = f"endpoint_override={endpoint}&scheme=http"
        storage = f"s3://sweeps/team?{query}"
        first = _cli(tmp_path, uri, "run", "spec.yaml", "--storage", f"{storage}&allow_bucket_creation=true")
        assert first.returncode == 0, first.stdout + first.stderr
        client, parent, _ = _check_store(uri)
        reported = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}  # `run` alone
        assert not (tmp_path / "report").exists()  # a bucket's sweep keeps no report in the cwd
        yield Sweep(tmp_path, uri, first, storage, endpoint, reported)


@dataclass
class Sweep:
    tmp_path: Path
    uri: str
    first: subprocess.CompletedProcess
    storage: str
    endpoint: str
    reported_after_run: set[str]
    """The parent run's report/ artifacts right after `run`, before any `sweeper report`."""

    def cli(self, *args):
        return _cli(self.tmp_path, self.uri, *args)

    def fs(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint, scheme="http", access_key="test", secret_key="test"
        )

    def files(self) -> set[str]:
        import pyarrow.fs as pafs

        fs = self.fs()
        selector = pafs.FileSelector("sweeps/team/e2e", recursive=True)
        return {i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File}

    def read_checkpoint(self, path: str) -> dict:
        import io

        import torch

        with self.fs().open_input_stream(path) as f:
            return torch.load(io.BytesIO(f.read()), weights_only=True)


def test_cli_sweep_logs_every_layer_every_epoch(sweep):
    assert "4 finished, 0 failed" in sweep.first.stdout
    assert f"mlflow ui --backend-store-uri {sweep.uri}" in sweep.first.stdout
    assert "Traceback" not in sweep.first.stderr
    client, parent, children = _check_store(sweep.uri)
    assert parent.data.metrics["trials_finished"] == 4
    # The parent run's Description and Source say what ran.
    note = parent.data.tags["mlflow.note.content"]
    assert (
        note.startswith("Sweep **e2e**: 4 trials of `mlp` on `gaussian`") and "`model.mlp.width` (2)" in note
    )
    assert "Reproduces:" in note
    assert parent.data.tags["mlflow.source.name"] == "python -m sweeper"
    # The parent has the report's table and figures from `run` alone.
    assert {"report/results.md", "report/ncc_acc_by_epoch.png"} <= sweep.reported_after_run
    digests = set()
    for child in children:
        # Params: what an MLP trial on this dataset uses, no other architecture's sections, no unset
        # fields; the whole resolved config is the artifact config.json. Tags a person reads are readable.
        params = child.data.params
        assert params["model.mlp.width"] in ("8", "12") and params["architecture"] == "mlp"
        assert not [k for k in params if k.startswith(("model.convnet", "model.vit", "model.resnet"))]
        assert "None" not in params.values()
        config = json.loads(Path(client.download_artifacts(child.info.run_id, "config.json")).read_text())
        assert config["model"]["vit"] and config["architecture"] == "mlp"
        assert child.data.tags["sweeper.metric_definitions"] == "version 2"
        assert "(Ray node " in child.data.tags["sweeper.node"]
        # The data it trained on, as MLflow's dataset input: one per run, the same for every trial here.
        (entry,) = client.get_run(child.info.run_id).inputs.dataset_inputs
        assert entry.dataset.name == "gaussian" and len(entry.dataset.digest) == 16
        assert json.loads(entry.dataset.profile) == {
            "train": 90,
            "test": 30,
            "classes": 3,
            "input_shape": [6],
        }
        assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "training")]
        digests.add(entry.dataset.digest)
        # Metrics: the per-epoch curves and the headline numbers; every metric at the best-test and the last
        # epoch is one table artifact, equal to the curves.
        headline = {"best_epoch", "interpolation_epoch", "test_acc_at_best_epoch", "test_acc_at_end"}
        keys = set(child.data.metrics)
        assert not [k for k in keys if k.startswith(("best/", "final/"))]
        per_epoch = {k for k in keys if client.get_metric_history(child.info.run_id, k)[-1].step > 0}
        assert keys - per_epoch <= headline | {"test_acc_at_interpolation"} and headline <= keys
        table = json.loads(Path(client.download_artifacts(child.info.run_id, "summary.json")).read_text())
        assert table["columns"] == ["metric", "best", "final"]
        best_epoch = int(child.data.metrics["best_epoch"])
        rows = {r[0]: r[1:] for r in table["data"]}
        assert set(rows) <= per_epoch and len(rows) > 50  # every row is one of the curves
        for key in ("test_acc", "nc1/train/fc2", "ncc_acc/test/fc1", "trainable_params"):
            history = {m.step: m.value for m in client.get_metric_history(child.info.run_id, key)}
            assert rows[key] == [history[best_epoch], history[max(history)]], key
        assert child.data.metrics["test_acc_at_end"] == rows["test_acc"][1]
        # Each trial logs its own figures, so the MLflow UI shows them without `sweeper report`.
        listed = {a.path for a in client.list_artifacts(child.info.run_id, "figures")}
        assert listed == {"figures/ncc_acc_by_epoch.png", "figures/nc1_heatmap.png"}
    assert len(digests) == 1


def _saved_view(client, experiment_id) -> tuple[str, dict, dict]:
    """The sweep's saved view as MLflow 3's UI reads it: an experiment tag ``mlflow.sharedViewState.<id>``
    holding ``{"name": str, "createdAt": number, "updatedAt": number, "state": JSON string}``."""
    tags = client.get_experiment(experiment_id).tags
    (key,) = [k for k in tags if k.startswith("mlflow.sharedViewState.")]
    envelope = json.loads(tags[key])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    return key.removeprefix("mlflow.sharedViewState."), envelope, json.loads(envelope["state"])


def test_the_sweep_has_a_saved_chart_view_without_the_parent_in_its_legends(sweep):
    """MLflow's default chart view draws the parent run, which holds no curves, as an empty legend entry
    in every chart. The sweep saves a view in the experiment's Views menu (this sweep's trials grouped by
    variant), linked from `run`'s output, `status` and the parent's description: every trial falls in a
    variant's group and the parent is not in the view at all."""
    client, parent, children = _check_store(sweep.uri)
    experiment_id = parent.info.experiment_id
    view_id, envelope, state = _saved_view(client, experiment_id)
    assert envelope["name"] == "e2e: trials by variant"
    assert state["groupBy"] == {
        "groupByKeys": [{"mode": "tag", "groupByData": "sweeper.cell"}],
        "aggregateFunction": "average",
    }
    # Its filter and order, through MLflow's own search, select this sweep's trials and no other run. The
    # order is not by start time: in that order (its default) MLflow 3.17's UI adds the parents of the
    # matching runs to the view, and the parent's "Unassigned" entry came back in every legend.
    assert state["orderByKey"] == "tags.`mlflow.runName`" and state["orderByAsc"] is True
    shown = client.search_runs([experiment_id], state["searchFilter"], order_by=["tags.`mlflow.runName` ASC"])
    assert {r.info.run_id for r in shown} == {c.info.run_id for c in children}
    cells = Counter(c.data.tags["sweeper.cell"] for c in children)
    assert cells == {"width=8": 2, "width=12": 2}  # one line per width, over 2 seeds, labelled as run names
    assert "sweeper.cell" not in parent.data.tags
    route = (
        f"/experiments/{experiment_id}/runs?viewStateShareKey={view_id}"
        "&compareRunsMode=CHART&workflowType=machine_learning"
    )
    assert f"charts: http://127.0.0.1:5000/#{route}" in sweep.first.stdout
    assert f"(#{route})" in parent.data.tags["mlflow.note.content"]


def test_sweep_directory_lives_in_the_bucket_with_one_bundle_per_width(sweep):
    files = sweep.files()
    assert {"sweeps/team/e2e/sweep.json", "sweeps/team/e2e/spec.yaml"} <= files
    assert any(p.startswith("sweeps/team/e2e/tune/experiment_state") for p in files), files
    assert not (sweep.tmp_path / "sweeps").exists()
    # Two Tune trials, one bundle per width; each bundle's checkpoint (the sweeper's own, one file per Tune
    # trial, not Tune's checkpoint folders) holds one slice per member trial, at the last epoch.
    _, _, children = _check_store(sweep.uri)
    keys = {c.data.tags["sweeper.trial_key"] for c in children}
    assert not [p for p in files if "/checkpoint_" in p], sorted(files)
    checkpoints = sorted(p for p in files if p.startswith("sweeps/team/e2e/checkpoints/"))
    assert len(checkpoints) == 2 and all(p.rsplit("/", 1)[1].startswith("bundle-") for p in checkpoints)
    slices = [sweep.read_checkpoint(p) for p in checkpoints]
    assert all(len(members) == 2 for members in slices)
    assert set().union(*slices) == keys
    assert {state["epoch"] for members in slices for state in members.values()} == {3}


def test_report_table_equals_mlflow_and_figures_are_images(sweep):
    import json

    import matplotlib.image

    tmp_path, uri = sweep.tmp_path, sweep.uri
    # Without --out, a sweep in a bucket reports to ./report/NAME.
    proc = sweep.cli("report", "e2e", "--storage", sweep.storage)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report" / "e2e" / "results.md").stat().st_size > 0
    out = tmp_path / "out"
    for fmt in ("csv", "json"):
        proc = sweep.cli("report", "e2e", "--storage", sweep.storage, "--format", fmt, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert (out / f"results.{fmt}").stat().st_size > 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in rows] == ["width=8", "width=12"]
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
        # From the trials' summary tables (summary.json), which hold the last epoch's counts.
        assert row["trainable_params"] == members[0].data.metrics["trainable_params"]
    # The spec's published number beside ours: mean and sample std over the variant's two seeds.
    [ref] = json.loads((out / "reference.json").read_text())
    narrow = next(r for r in rows if r["variant"] == "width=8")
    assert ref["variant"] == "width=8" and ref["n"] == 2 and ref["paper"] == 50.0
    assert ref["mean"] == pytest.approx(100 * narrow["best_test_acc"])
    assert ref["difference"] == pytest.approx(50.0 - ref["mean"])
    assert "a made-up paper, Table 9" in proc.stdout and "paper - ours" in proc.stdout
    pngs = sorted(out.rglob("*.png"))
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


def test_running_again_resumes_without_training_or_logging_twice(sweep, monkeypatch):
    _, parent, children = _check_store(sweep.uri)
    sweep_uri = f"s3://sweeps/team/e2e?endpoint_override={sweep.endpoint}&scheme=http"
    status = sweep.cli("status", sweep_uri, "--json")
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["charts"].startswith("http://127.0.0.1:5000/#/experiments/")
    view_before = _saved_view(MlflowClient(sweep.uri), parent.info.experiment_id)[1]
    assert state["counts"]["FINISHED"] == 4 and state["planned"] == 4
    assert all(t["epoch"] == 3 for t in state["trials"])
    # `resume` takes the frozen spec from the sweep directory in the bucket and restores Tune's experiment
    # from there; the finished sweep trains nothing again.
    second = sweep.cli("resume", sweep_uri)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "4 finished, 0 failed" in second.stdout
    _, parent2, children2 = _check_store(sweep.uri)
    assert parent2.info.run_id == parent.info.run_id
    # The resume made the report again (a failure would warn) and kept the description.
    assert "was not logged to its parent run" not in second.stderr
    assert parent2.data.tags["mlflow.note.content"] == parent.data.tags["mlflow.note.content"]
    # The resume found the saved view (one, unchanged); `status` links it.
    client = MlflowClient(sweep.uri)
    assert _saved_view(client, parent.info.experiment_id)[1] == view_before
    assert f"charts: {state['charts']}" in sweep.cli("status", sweep_uri).stdout
    assert {c.info.run_id for c in children2} == {c.info.run_id for c in children}
    # Read as data from the bucket after the resume: every member once, every epoch once.
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    frame = assert_histories_match_mlflow(sweep_uri, sweep.storage)
    assert set(frame["run_id"]) == {c.info.run_id for c in children} and set(frame["epoch"]) == {1, 2, 3}
    exported = sweep.cli("export", sweep_uri, "--trials", "--out", str(sweep.tmp_path / "trials.csv"))
    assert exported.returncode == 0, exported.stderr
    assert len(pd.read_csv(sweep.tmp_path / "trials.csv")) == 4
    missing = sweep.cli("status", f"s3://sweeps/team/nothing?endpoint_override={sweep.endpoint}&scheme=http")
    assert missing.returncode == 2 and "no sweep" in missing.stderr and "Traceback" not in missing.stderr


def test_search_in_an_object_store_needs_a_database_for_optuna(tmp_path):
    """Optuna's default SQLite file cannot live in a bucket: refused before anything is written."""
    from sweeper.orchestrate import run_sweep
    from sweeper.spec import SpecError, load_spec

    spec = SPEC.replace("bundle: 2", "").replace(
        "grid:", "search: {space: {train.optimizer.lr: {loguniform: [0.01, 0.1]}}}\ngrid:"
    )
    (tmp_path / "spec.yaml").write_text(spec)
    with pytest.raises(SpecError, match="search.optuna.storage: the sweep directory .* object store"):
        run_sweep(
            load_spec(tmp_path / "spec.yaml"),
            storage="s3://bucket/x?endpoint_override=127.0.0.1:9&scheme=http",
            address=None,
            tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        )


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
