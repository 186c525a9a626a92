"""Bayesian search per grid cell with real Ray and real Optuna storage (SQLite and Postgres). Resuming
after SIGKILLs of the driver mid-search is tests/test_kill_stress.py."""

from __future__ import annotations

import json
from collections import Counter

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from sweeper.orchestrate import run_sweep
from sweeper.results import load_trials
from sweeper.search import ORPHANED, STUDY_CELL, STUDY_PARENT_RUN, STUDY_SWEEP, TRIAL_RUN_ID
from sweeper.spec import SpecError, load_spec
from sweeper.status import format_status, sweep_status
from sweeper.tracking import key_label
from tests.histories import assert_histories_match_mlflow
from tests.services import mlflow_uri, postgres_available, postgres_server

pytestmark = pytest.mark.slow

SPEC = {
    "name": "search",
    "experiment": "search-test",
    "dataset": "gaussian",
    "data": {"gaussian": {"classes": 3, "dim": 6, "train_per_class": 30, "test_per_class": 10}},
    "model": {"mlp": {"depth": 3, "width": 8}},
    "train": {"epochs": 2, "batch_size": 32},
    "checkpoint": {"every": 1},
    "grid": {"etf": [{"depth": 0}, {"depth": 1}]},
    "search": {
        "optuna": {"sampler": "tpe", "trials_per_cell": 3, "max_concurrent": 2, "seed": 0},
        "space": {"svsl.alpha": {"loguniform": [5.0e-8, 5.0e-5]}, "svsl.gamma": {"int": [1, 2]}},
    },
}


def _write(tmp_path, spec):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _studies(storage_url):
    return {
        s.study_name: optuna.load_study(study_name=s.study_name, storage=storage_url)
        for s in optuna.get_all_study_summaries(storage_url)
    }


def _check_exact_budget(storage_url, uri, cells=2, budget=3, experiment="search-test"):
    studies = _studies(storage_url)
    assert len(studies) == cells
    for study in studies.values():
        counted = [t for t in study.trials if not t.user_attrs.get(ORPHANED)]
        assert len(counted) == budget, study.study_name
        assert all(t.state == TrialState.COMPLETE for t in counted), [t.state for t in counted]
        assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == cells * budget
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert Counter(r.data.tags["sweeper.study"] for r in finished) == {name: budget for name in studies}
    # One label per cell in every client: the tag the chart view groups by, the run name, the study's
    # name (the sweep's name, the label, a piece of the sweep id), the parent's best-of-cell keys.
    parent = next(r for r in runs if r.data.tags.get("sweeper.role") == "parent")
    sweep_id = parent.data.tags["sweeper.sweep_id"]
    labels = {"etf=depth:0", "etf=depth:1"}
    for run in finished:
        cell = run.data.tags["sweeper.cell"]
        assert cell in labels
        assert run.info.run_name.startswith(f"{cell} trial=")
        assert run.data.tags["sweeper.study"] == f"{parent.info.run_name} {cell} [{sweep_id[:12]}]"
        assert run.data.tags["sweeper.study_trial"].isdigit()
        assert 5e-8 <= float(run.data.params["svsl.alpha"]) <= 5e-5
    assert {k for k in parent.data.metrics if k.startswith("best_value/")} == {
        "best_value/etf:depth:0",
        "best_value/etf:depth:1",
    }
    best = {k: json.loads(v) for k, v in parent.data.tags.items() if k.startswith("sweeper.best.")}
    assert {k: v["cell"] for k, v in best.items()} == {
        "sweeper.best.etf:depth:0": "etf=depth:0",
        "sweeper.best.etf:depth:1": "etf=depth:1",
    }
    for info in best.values():
        assert info["study"] in studies
        trial = studies[info["study"]].trials[info["study_trial"]]
        assert trial.value == info["value"] == parent.data.metrics[f"best_value/{key_label(info['cell'])}"]


def test_bundled_search_runs_exact_budget_per_cell_one_study_trial_per_member(tmp_path, local_ray):
    # TPE here; GP runs in svsl_search.yaml's smoke mode (test_search_spaces). With a few trials per cell
    # both stay in their random start-up phase, so one sampler per sweep test is enough. Unbundled
    # searches run in the Postgres and driver-kill tests below.
    spec = {**SPEC, "bundle": 2}
    loaded = load_spec(_write(tmp_path, spec))
    uri = mlflow_uri(tmp_path)
    result = run_sweep(loaded, storage=tmp_path / "sweeps", address=None, tracking_uri=uri, progress=False)
    assert len(result.outcomes) == 6 and all(o.status == "FINISHED" for o in result.outcomes)
    storage_url = f"sqlite:///{result.sweep_dir.local_path / 'optuna.db'}"
    _check_exact_budget(storage_url, uri)
    # Three Tune trials, each a bundle of one study trial from each cell (same group: only etf differs).
    tune_dir = result.sweep_dir.local_path / "tune"
    assert len([p for p in tune_dir.iterdir() if p.name.startswith("trial_bundle-")]) == 3
    # Each member was told its own objective: the study's value is the test_acc its own MLflow run logged.
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("search-test").experiment_id])
    logged = {
        (r.data.tags["sweeper.study"], int(r.data.tags["sweeper.study_trial"])): r.data.metrics["test_acc"]
        for r in runs
        if r.data.tags.get("sweeper.role") == "trial"
    }
    run_ids = {
        (r.data.tags["sweeper.study"], int(r.data.tags["sweeper.study_trial"])): r.info.run_id
        for r in runs
        if r.data.tags.get("sweeper.role") == "trial"
    }
    parent = next(r for r in runs if r.data.tags.get("sweeper.role") == "parent")
    for name, study in _studies(storage_url).items():
        for trial in study.trials:
            assert trial.value == pytest.approx(logged[(name, trial.number)], rel=1e-12)
            # optuna-dashboard leads from a study trial to its MLflow run...
            assert trial.user_attrs[TRIAL_RUN_ID] == run_ids[(name, trial.number)]
        # ...names the objective on its axes, and shows the sweep, the cell and the parent run.
        assert study.metric_names == ["test_acc"]
        cell = next(r.data.tags["sweeper.cell"] for r in runs if r.data.tags.get("sweeper.study") == name)
        assert study.user_attrs[STUDY_SWEEP] == loaded.spec.name and study.user_attrs[STUDY_CELL] == cell
        assert study.user_attrs[STUDY_PARENT_RUN] == parent.info.run_id
    assert f"optuna-dashboard {storage_url}" in parent.data.tags["mlflow.note.content"]
    status = sweep_status(result.sweep_dir)
    assert status["optuna"] == f"optuna-dashboard {storage_url}" and status["optuna"] in format_status(status)
    # Searched trials read as data: one row per study trial, naming its study and study trial.
    frame = assert_histories_match_mlflow(loaded.spec.name, tmp_path / "sweeps")
    trials = load_trials(loaded.spec.name, tmp_path / "sweeps")
    assert sorted(zip(trials["study"], trials["study_trial"])) == sorted(logged)
    assert set(frame["run_id"]) == set(trials["run_id"])


def _searcher(tmp_path, **overrides):
    from sweeper.search import CellSearcher

    trial = {"svsl": {"alpha": 0.0, "gamma": 1}}
    cells = [
        {"key": f"c{i}", "name": f"etf={i}", "trial": trial, "data_root": "/data", "group": group}
        for i, group in enumerate(["g", "g", "h"])
    ]
    settings = dict(
        cells=cells,
        space={"svsl.alpha": {"loguniform": [1e-6, 1e-3]}},
        sampler="tpe",
        seed=0,
        trials_per_cell=3,
        max_concurrent=2,
        storage_url=f"sqlite:///{tmp_path / 'optuna.db'}",
        sweep={"sweep_id": "s1", "tracking_uri": mlflow_uri(tmp_path), "experiment_id": "0"},
        metric="test_acc",
        mode="max",
        bundle=4,
    )
    return CellSearcher(**(settings | overrides))


def test_bundled_searcher_asks_and_tells_each_member_as_its_own_study_trial(tmp_path):
    searcher = _searcher(tmp_path)
    assert searcher.metric is None  # Tune would look for test_acc in results that hold m0:test_acc
    first = searcher.suggest("a")["point"]
    # Round-robin over the cells of one group: two study trials from each of c0 and c1.
    assert [m["key"] for m in first["bundle"]] == ["c0-t0", "c1-t0", "c0-t1", "c1-t1"]
    assert [m["tags"]["sweeper.study_trial"] for m in first["bundle"]] == ["0", "0", "1", "1"]
    alphas = [m["trial"]["svsl"]["alpha"] for m in first["bundle"]]
    assert len(set(alphas)) == 4 and all(1e-6 <= a <= 1e-3 for a in alphas)
    searcher.save(str(tmp_path / "snapshot.pkl"))
    # c2 is of another group (say another dataset): its study trials bundle only among themselves, up to
    # its budget; then the concurrency limit holds.
    second = searcher.suggest("b")["point"]
    assert [m["key"] for m in second["bundle"]] == ["c2-t0", "c2-t1", "c2-t2"]
    assert searcher.suggest("c") is None

    searcher.on_trial_complete(
        "a",
        {
            "m0:test_acc": 0.5,
            "m1:test_acc": 0.7,
            "m2:test_acc": 0.9,
            "m2:error": "TrialDiverged: nan",
            "m3:test_acc": float("nan"),
        },
    )
    c0, c1 = searcher.study(0), searcher.study(1)
    assert [(t.state, t.value) for t in c0.trials] == [(TrialState.COMPLETE, 0.5), (TrialState.FAIL, None)]
    assert [(t.state, t.value) for t in c1.trials] == [(TrialState.COMPLETE, 0.7), (TrialState.FAIL, None)]

    # A driver killed after "b" was asked but before the snapshot held it: the restored searcher marks
    # c2's study trials orphans, which do not count, so c2 asks its budget again.
    restored = _searcher(tmp_path)
    restored.restore(str(tmp_path / "snapshot.pkl"))
    again = restored.suggest("d")["point"]
    orphans = restored.study(2).trials[:3]
    assert all(t.state == TrialState.FAIL and t.user_attrs[ORPHANED] for t in orphans)
    assert [m["key"] for m in again["bundle"]] == ["c2-t3", "c2-t4", "c2-t5"]
    # The replayed bundle's members were told before the kill: completing it again changes nothing.
    restored.on_trial_complete("a", {"m0:test_acc": 0.1, "m1:test_acc": 0.1})
    assert [t.value for t in restored.study(0).trials] == [0.5, None]


def test_asha_pruning_stops_trials_early_and_keeps_the_budget(tmp_path, local_ray):
    spec = {
        **SPEC,
        "train": {"epochs": 6, "batch_size": 32},
        "grid": {"etf": [{"depth": 0}]},
        # One trial at a time and a learning rate that matters: the rung decisions are deterministic.
        "search": {
            "optuna": {"sampler": "tpe", "trials_per_cell": 4, "max_concurrent": 1, "seed": 0},
            "space": {"train.optimizer.lr": {"loguniform": [1.0e-4, 0.5]}},
            "prune": {"grace_period": 1, "reduction_factor": 2},
        },
    }
    loaded = load_spec(_write(tmp_path, spec))
    uri = mlflow_uri(tmp_path)
    result = run_sweep(loaded, storage=tmp_path / "sweeps", address=None, tracking_uri=uri, progress=False)
    epochs = [int(o.metrics["epoch"]) for o in result.outcomes]
    assert len(epochs) == 4 and min(epochs) < 6, epochs  # ASHA stopped at least one trial at a rung
    (study,) = _studies(f"sqlite:///{result.sweep_dir.local_path / 'optuna.db'}").values()
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4


@pytest.mark.skipif(not postgres_available(), reason="PostgreSQL binaries not installed")
def test_search_with_postgres_storage(tmp_path, local_ray):
    with postgres_server() as url:
        spec = {**SPEC, "search": {**SPEC["search"], "optuna": {**SPEC["search"]["optuna"], "storage": url}}}
        loaded = load_spec(_write(tmp_path, spec))
        uri = mlflow_uri(tmp_path)
        run_sweep(loaded, storage=tmp_path / "sweeps", address=None, tracking_uri=uri, progress=False)
        _check_exact_budget(url, uri)


def test_search_space_is_validated_against_the_model(tmp_path):
    bad = {
        **SPEC,
        "search": {
            **SPEC["search"],
            "space": {"svsl.gamma": {"int": [1, 5]}, "svsl.alpha": {"choice": [1e-5]}},
        },
    }
    with pytest.raises(SpecError, match="svsl.gamma: 5 is beyond the model's 2 taps"):
        load_spec(_write(tmp_path, bad))
    clash = {**SPEC, "search": {**SPEC["search"], "space": {"etf": {"choice": [{"depth": 1}]}}}}
    with pytest.raises(SpecError, match="etf is both searched and in the grid"):
        load_spec(_write(tmp_path, clash))


def _tune_snapshot(folder, session, trials):
    """Tune's trial table as ``Tuner.restore`` reads it (the fields the searcher uses, in Tune's layout:
    each trial a JSON string beside its run metadata)."""
    import json

    folder.mkdir(exist_ok=True)
    data = [
        [json.dumps({"trial_id": tid, "status": status, "config": {"point": point}}), {}]
        for tid, status, point in trials
    ]
    (folder / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": data}))


def test_restored_searcher_takes_live_trials_from_tunes_trial_table_not_its_own_snapshot(tmp_path):
    # Tune writes its trial table, then the searcher's state: a driver killed between the two leaves a
    # searcher snapshot older than the table. The searcher must follow the table.
    tune = tmp_path / "tune"
    searcher = _searcher(tmp_path, experiment=str(tune))
    a = searcher.suggest("a")["point"]
    searcher.save(str(tmp_path / "snapshot.pkl"))  # the searcher's last snapshot: only "a" live
    b = searcher.suggest("b")["point"]  # asked after it, but in Tune's table
    _tune_snapshot(tune, "2026-01-01_00-00-00", [("a", "RUNNING", a)])  # an older session's table
    _tune_snapshot(tune, "2026-01-02_00-00-00", [("a", "TERMINATED", a), ("b", "PENDING", b)])
    # The resumed session's own first table, caught half copied into place: the one restored from counts.
    (tune / "experiment_state-2026-01-03_00-00-00.json").write_text('{"trial_data": [["{\\"trial_id')
    searcher.on_trial_complete("a", {f"m{i}:test_acc": 0.5 for i in range(4)})  # "a" ended before the kill

    restored = _searcher(tmp_path, experiment=str(tune))
    restored.restore(str(tmp_path / "snapshot.pkl"))
    # "a" ended (Tune will not run it again) and "b" will run again: c2's study trials are b's, not orphans,
    # and the concurrency limit counts b alone.
    assert restored.suggest("c") is not None
    c2 = restored.study(2).trials
    assert [t.state for t in c2] == [TrialState.RUNNING] * 3 and not any(t.user_attrs for t in c2)
    assert set(restored.live) == {"b", "c"}
    restored.on_trial_complete("b", {"m0:test_acc": 0.25, "m1:test_acc": 0.5, "m2:test_acc": 0.75})
    assert [t.value for t in restored.study(2).trials] == [0.25, 0.5, 0.75]
    # Every cell is now asked to its budget; once "c" ends the search is finished.
    restored.on_trial_complete("c", {f"m{i}:test_acc": 0.5 for i in range(4)})
    assert restored.suggest("d") == restored.FINISHED
