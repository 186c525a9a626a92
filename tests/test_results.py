"""Results as data: ``load_histories``/``load_trials`` equal MLflow's own histories value for value, read
in bulk from SQLite, PostgreSQL and an ``mlflow server``; ``sweeper export`` round-trips through Parquet
and CSV; ``sweeper report A B`` over two sweeps of one spec equals the report of one sweep running both
seed sets, and sweeps that are not one spec are refused naming what differs. The resumed, searched and
object-store cases are checked where those sweeps already run (test_kill_stress, test_search,
test_sweep_e2e) with :func:`tests.histories.assert_histories_match_mlflow`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from sweeper.results import HEADLINE, load_histories, load_trials, read_metric_rows, split_key
from sweeper.tracking import SENTINEL
from tests.histories import assert_histories_match_mlflow
from tests.services import mlflow_server, mlflow_uri, postgres_available, postgres_server

SPEC = """
name: {name}
experiment: results-test
dataset: gaussian
data: {{gaussian: {{classes: 3, dim: 6, train_per_class: 30, test_per_class: 10}}}}
model: {{mlp: {{depth: 3, width: 8}}}}
train: {{epochs: 4, batch_size: 32}}
metrics: {{every: 2}}
grid:
  model.mlp.width: [8, 12]
  seed: {seeds}
resources: {{cpu: 1}}
reference:
  - source: a made-up paper, Table 9
    match: {{model.mlp.width: 8}}
    values: {{best_test_acc: 50.0}}
"""


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, local_ray):
    """Three real sweeps of one spec in one SQLite store: seeds [0, 1], [2], and [0, 1, 2] together."""
    from sweeper.orchestrate import run_sweep
    from sweeper.spec import load_spec

    tmp = tmp_path_factory.mktemp("results")
    uri = mlflow_uri(tmp)
    for name, seeds in (("pool-a", "[0, 1]"), ("pool-b", "[2]"), ("pool-all", "[0, 1, 2]")):
        path = tmp / f"{name}.yaml"
        path.write_text(SPEC.format(name=name, seeds=seeds))
        result = run_sweep(
            load_spec(path), storage=tmp / "sweeps", address=None, tracking_uri=uri, progress=False
        )
        assert all(o.status == "FINISHED" for o in result.outcomes)
    return tmp, uri


def _cli(tmp, uri, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run(
        [sys.executable, "-m", "sweeper", *args, "--storage", str(tmp / "sweeps")],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_histories_equal_mlflows_value_for_value_with_the_trials_varying_values(sweeps):
    tmp, _ = sweeps
    frame = assert_histories_match_mlflow("pool-all", tmp / "sweeps")
    trials = load_trials("pool-all", tmp / "sweeps")
    assert len(trials) == 6 and set(trials["status"]) == {"FINISHED"}
    # The varying values are columns; the seed always; a field that does not vary is not.
    assert {"seed", "model.mlp.width"} <= set(trials.columns) and "train.epochs" not in trials.columns
    assert sorted(zip(trials["model.mlp.width"], trials["seed"])) == [
        (w, s) for w in (8, 12) for s in (0, 1, 2)
    ]
    assert (trials["epochs"] == 4).all() and trials["test_acc_at_end"].notna().all()
    # Metrics measured every 2 epochs appear at epochs 2 and 4 only; accuracy every epoch.
    nc1 = frame[(frame["metric"] == "nc1") & (frame["split"] == "train") & (frame["layer"] == "fc1")]
    assert set(nc1["epoch"]) == {2, 4} and len(nc1) == 12
    acc = frame[(frame["metric"] == "acc") & (frame["split"] == "test")]
    assert sorted(set(acc["epoch"])) == [1, 2, 3, 4] and len(acc) == 24
    assert not set(frame["key"].astype(str)) & (set(HEADLINE) | {SENTINEL})


@pytest.mark.slow
def test_filters_read_only_what_is_asked(sweeps):
    tmp, _ = sweeps
    full = load_histories("pool-all", tmp / "sweeps")
    some = load_histories(
        "pool-all", tmp / "sweeps", metrics=["nc1", "acc"], splits="train", layers=["fc1"], epochs=(2, 3)
    )
    # acc has no layer: a layer filter keeps only per-layer keys.
    want = full[(full["key"] == "nc1/train/fc1") & full["epoch"].between(2, 3)]
    assert set(some["key"].astype(str)) == {"nc1/train/fc1"} and set(some["epoch"]) == {2}
    assert some["value"].tolist() == want["value"].tolist() and len(some) == 6


@pytest.mark.slow
def test_export_round_trips_through_parquet_and_csv(sweeps):
    tmp, uri = sweeps
    frame = load_histories("pool-a", tmp / "sweeps")
    for suffix in ("parquet", "csv"):
        out = tmp / f"histories.{suffix}"
        proc = _cli(tmp, uri, "export", "pool-a", "--out", str(out))
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        back = pd.read_parquet(out) if suffix == "parquet" else pd.read_csv(out)
        assert list(back.columns) == list(frame.columns)
        assert len(back) == len(frame) > 0
        assert (back["value"].to_numpy() == frame["value"].to_numpy()).all()  # CSV keeps every digit
        assert back["key"].astype(str).tolist() == frame["key"].astype(str).tolist()
    proc = _cli(tmp, uri, "export", "pool-a", "pool-b", "--trials", "--out", str(tmp / "trials.csv"))
    trials = pd.read_csv(tmp / "trials.csv")
    assert proc.returncode == 0 and sorted(trials["sweep"]) == ["pool-a"] * 4 + ["pool-b"] * 2
    assert "tracking_uri" not in trials.columns
    # A suffix that names no format: refused, nothing written.
    proc = _cli(tmp, uri, "export", "pool-a", "--out", str(tmp / "histories.xlsx"))
    assert proc.returncode == 2 and ".parquet or .csv" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp / "histories.xlsx").exists()


@pytest.mark.slow
def test_report_over_two_sweeps_equals_the_report_of_one_sweep_running_both_seed_sets(sweeps):
    tmp, uri = sweeps
    pooled = _cli(tmp, uri, "report", "pool-a", "pool-b", "--format", "json", "--out", str(tmp / "pooled"))
    single = _cli(tmp, uri, "report", "pool-all", "--format", "json", "--out", str(tmp / "single"))
    assert pooled.returncode == 0 and single.returncode == 0, pooled.stderr + single.stderr
    assert "logged to none of them" in pooled.stdout
    # Two cells in the table; one reference row (width 8) in the comparison.
    for name, rows in (("results.json", 2), ("reference.json", 1)):
        a = json.loads((tmp / "pooled" / name).read_text())
        b = json.loads((tmp / "single" / name).read_text())
        assert len(a) == len(b) == rows
        for row_a, row_b in zip(a, b, strict=True):
            assert row_a.keys() == row_b.keys()
            for key, value in row_a.items():
                if isinstance(value, float):
                    assert value == pytest.approx(row_b[key], rel=1e-12, abs=1e-15), (name, key)
                else:
                    assert value == row_b[key], (name, key)
    assert json.loads((tmp / "pooled" / "results.json").read_text())[0]["n"] == 3


@pytest.mark.slow
def test_report_refuses_sweeps_that_are_not_one_spec_over_other_seeds(sweeps):
    tmp, uri = sweeps
    # The same trials twice: pool-all ran seeds 0 and 1, as pool-a did.
    proc = _cli(tmp, uri, "report", "pool-a", "pool-all")
    assert proc.returncode == 2 and "both ran" in proc.stderr and "Traceback" not in proc.stderr
    # Another training length: named, nothing written.
    other = tmp / "sweeps" / "pool-long"
    shutil.copytree(tmp / "sweeps" / "pool-b", other)
    spec = yaml.safe_load((other / "spec.yaml").read_text())
    spec["train"]["epochs"] = 5
    spec["metrics"]["every"] = 1
    (other / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = _cli(tmp, uri, "report", "pool-a", "pool-long", "--out", str(tmp / "refused"))
    assert proc.returncode == 2 and "differ in metrics.every, train.epochs" in proc.stderr, proc.stderr
    assert not (tmp / "refused").exists()
    shutil.rmtree(other)


def _synthetic_run(client: MlflowClient, name: str) -> str:
    """A run with three complete epochs (a NaN among them), step 2 of one key stored twice (a request
    retried after an outage: the later row stands) and a fourth epoch without its sentinel (a killed
    batch): what the bulk readers must handle as MLflow's own histories do."""
    experiment = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    run = client.create_run(experiment.experiment_id).info.run_id
    t = int(time.time() * 1000)
    for epoch in (1, 2, 3):
        metrics = [
            Metric("nc1/train/fc1", 1.0 / epoch, t + epoch, epoch),
            Metric("test_acc", 0.5 + epoch / 10, t + epoch, epoch),
        ]
        if epoch == 2:
            metrics.append(Metric("cdnv/test/fc2", float("nan"), t + epoch, epoch))
        client.log_batch(run, metrics=[*metrics, Metric(SENTINEL, float(epoch), t + epoch, epoch)])
    client.log_batch(run, metrics=[Metric("nc1/train/fc1", 0.25, t + 10, 2)])  # the retry, later
    client.log_batch(run, metrics=[Metric("test_acc", 0.99, t + 11, 4)])  # epoch 4: no sentinel
    return run


def _expected_rows(run: str) -> dict[tuple[str, str, int], float]:
    return {
        (run, "nc1/train/fc1", 1): 1.0,
        (run, "nc1/train/fc1", 2): 0.25,
        (run, "nc1/train/fc1", 3): 1.0 / 3,
        (run, "test_acc", 1): 0.6,
        (run, "test_acc", 2): 0.7,
        (run, "test_acc", 3): 0.8,
        (run, "cdnv/test/fc2", 2): float("nan"),
    }


def _check_rows(uri: str, runs: list[str]) -> None:
    keys = {run: ["nc1/train/fc1", "test_acc", "cdnv/test/fc2"] for run in runs}
    rows = read_metric_rows(uri, keys)
    got = {(r.run_id, r.key, r.epoch): r.value for r in rows.itertuples()}
    expected = {k: v for run in runs for k, v in _expected_rows(run).items()}
    assert got.keys() == expected.keys(), uri
    for point, value in expected.items():
        assert got[point] == pytest.approx(value, rel=1e-15, nan_ok=True), (uri, point)


def test_bulk_readers_of_sqlite_a_server_and_key_by_key_agree(tmp_path):
    uri = mlflow_uri(tmp_path)
    runs = [_synthetic_run(MlflowClient(uri), "bulk") for _ in range(3)]
    _check_rows(uri, runs)
    with mlflow_server(uri, tmp_path) as server:
        _check_rows(server, runs)  # the bulk history endpoint


def test_bulk_reader_of_a_file_store_goes_key_by_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.17 refuses a new ./mlruns otherwise
    uri = f"file://{tmp_path}/mlruns"
    runs = [_synthetic_run(MlflowClient(uri), "bulk")]
    _check_rows(uri, runs)


@pytest.mark.slow
@pytest.mark.skipif(not postgres_available(), reason="PostgreSQL binaries not installed")
def test_bulk_reader_of_postgresql(tmp_path):
    with postgres_server() as uri:
        runs = [_synthetic_run(MlflowClient(uri), "bulk") for _ in range(2)]
        _check_rows(uri, runs)


@pytest.mark.parametrize(
    "key, parts",
    [
        ("nc1/train/fc2", ("nc1", "train", "fc2")),
        ("ncc_acc/test/block1.out", ("ncc_acc", "test", "block1.out")),
        ("test_acc", ("acc", "test", None)),
        ("train_loss", ("loss", "train", None)),
        ("batch_loss", ("batch_loss", None, None)),
        ("effective_depth/eps_0.05", ("effective_depth/eps_0.05", None, None)),
        ("etf_fixed_epoch/fc3", ("etf_fixed_epoch", None, "fc3")),
        ("lr", ("lr", None, None)),
    ],
)
def test_metric_keys_split_into_metric_split_and_layer(key, parts):
    assert split_key(key) == parts


@pytest.mark.slow
def test_the_analysis_script_in_docs_runs_on_two_real_sweeps(sweeps):
    tmp, uri = sweeps
    script = Path(__file__).resolve().parents[1] / "docs" / "analysis.py"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    out = tmp / "analysis"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "pool-a",
            "pool-b",
            "--storage",
            str(tmp / "sweeps"),
            "--out",
            str(out),
        ],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Each sweep's variants with their seed counts, and the two figures as real PNGs.
    assert "width=8" in proc.stdout and "width=12" in proc.stdout
    for name in ("by_layer.png", "compare.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
