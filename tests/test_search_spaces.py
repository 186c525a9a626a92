"""Every spec in search_spaces/ validates as written (the papers' settings) and runs end to end in its
smoke mode on a real local Ray, logging to a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeper.orchestrate import run_sweep
from sweeper.spec import expand, load_spec
from tests.services import mlflow_uri

SPECS = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def test_every_spec_has_a_smoke_mode():
    assert {p.name for p in SPECS} >= {
        "quickstart.yaml",
        "etf_depth.yaml",
        "adaptive_etf.yaml",
        "etf_transformer.yaml",
        "intermediate_nc.yaml",
        "svsl.yaml",
    }
    for path in SPECS:
        full, smoke = expand(load_spec(path)), expand(load_spec(path, smoke=True))
        assert smoke and len(smoke) <= len(full), path.name
        assert all(t.config.dataset in ("digits", "gaussian", "mnist1d") for t in smoke), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_runs_in_smoke_mode(path, tmp_path, local_ray):
    uri = mlflow_uri(tmp_path)
    loaded = load_spec(path, smoke=True)
    result = run_sweep(loaded, storage=tmp_path / "sweeps", address=None, tracking_uri=uri, progress=False)
    search = loaded.spec.search
    planned = len(expand(loaded)) * (search.optuna.trials_per_cell if search else 1)
    assert [o.status for o in result.outcomes] == ["FINISHED"] * planned, [o.error for o in result.outcomes]
    client = MlflowClient(uri)
    children = client.search_runs(
        [result.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )
    assert len(children) == len(result.outcomes)
    epochs = loaded.spec.train.epochs
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "epoch")] == list(
            range(1, epochs + 1)
        )
        assert any(k.startswith("ncc_acc/train/") for k in child.data.metrics)
