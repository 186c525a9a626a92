"""The driver SIGKILLed at random instants and resumed each time, on a sweep of trial bundles
and on a searched sweep, against a real local Ray and a real SQLite MLflow store.

Half the kills come a random instant after the driver started, the other half within 0.3 s of a
checkpoint being written. Only the driver is killed: what its Ray instance leaves running must be ended
by the next run from the PIDs it recorded (sweeper.local_ray). At the end every planned trial has exactly
one FINISHED child run with epochs 1..E, none is FAILED or RUNNING, and no process of a killed driver is
alive. ``SWEEPER_STRESS_SEED`` replays a failing schedule; each resume's findings are printed (-s).

One kill is placed, not drawn: between Tune's two snapshot writes (its trial table, then the searcher's
state), which the random kills hit about once in ten runs.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.histories import assert_histories_match_mlflow
from tests.services import kill_tree, mlflow_uri

pytestmark = pytest.mark.slow

KILLS = 8
COMMON = {
    "experiment": "stress",
    "dataset": "gaussian",
    "data": {"gaussian": {"classes": 3, "dim": 6, "train_per_class": 30, "test_per_class": 10}},
    "model": {"mlp": {"depth": 3, "width": 8}},
    "checkpoint": {"every": 1},
    "resources": {"cpu": 1},
    "max_failures": 3,
}
GRID = {
    **COMMON,
    "name": "stress-grid",
    "train": {"epochs": 40, "batch_size": 32},
    "grid": {"seed": [0, 1, 2, 3]},
    "bundle": 2,
}
SEARCH = {
    **COMMON,
    "name": "stress-search",
    "train": {"epochs": 12, "batch_size": 32},
    "grid": {"etf": [{"depth": 0}, {"depth": 1}]},
    "search": {
        "optuna": {"sampler": "tpe", "trials_per_cell": 3, "max_concurrent": 2, "seed": 0},
        "space": {"svsl.alpha": {"loguniform": [5.0e-8, 5.0e-5]}, "svsl.gamma": {"int": [1, 2]}},
    },
}


class Driver:
    """One `sweeper run` process, with every process seen below it while it ran."""

    def __init__(self, tmp_path, spec_path, uri) -> None:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "sweeper", "run", str(spec_path), "--storage", str(tmp_path / "sweeps")]
        self.log = open(tmp_path / "driver.log", "a")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self.seen: dict[int, float] = {}

    def watch(self) -> bool:
        """Note the processes below the driver; False once it has exited."""
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                try:
                    self.seen.setdefault(child.pid, child.create_time())
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        return self.process.poll() is None

    def kill(self) -> None:
        self.watch()
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def alive_left(self) -> list[int]:
        out = []
        for pid, created in self.seen.items():
            try:
                if psutil.Process(pid).create_time() == created:
                    out.append(pid)
            except psutil.Error:
                pass
        return out


def _checkpoint_times(sweep_dir) -> dict[str, float]:
    folder = sweep_dir / "checkpoints"
    try:
        return {p.name: p.stat().st_mtime for p in folder.glob("*.pt")}
    except OSError:
        return {}


def _children(client):
    exp = client.get_experiment_by_name("stress")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'trial'")


def _state(client) -> str:
    children = _children(client)
    finished = sum(c.info.status == "FINISHED" for c in children)
    epochs = sorted(int(c.data.metrics.get("epoch", 0)) for c in children)
    return f"{len(children)} child runs, {finished} FINISHED, epochs {epochs}"


def _stress(tmp_path, spec, rng, planned_check) -> list[str]:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    uri = mlflow_uri(tmp_path)
    client = MlflowClient(uri)
    sweep_dir = tmp_path / "sweeps" / spec["name"]
    killed: list[Driver] = []
    found: list[str] = []
    try:
        for i in range(KILLS):
            driver = Driver(tmp_path, spec_path, uri)
            after_checkpoint = i % 2 == 1
            before = _checkpoint_times(sweep_dir)
            delay = rng.uniform(1.0, 14.0)
            deadline = driver.started + 240
            while driver.watch() and time.monotonic() < deadline:
                if after_checkpoint:
                    if _checkpoint_times(sweep_dir) != before:
                        time.sleep(rng.uniform(0.0, 0.3))
                        break
                elif time.monotonic() - driver.started >= delay:
                    break
                time.sleep(0.02)
            assert driver.process.poll() is None, (
                f"kill {i + 1}: the sweep ended before it (tail of driver.log: "
                f"{(tmp_path / 'driver.log').read_text()[-2000:]})"
            )
            at = time.monotonic() - driver.started
            driver.kill()
            killed.append(driver)
            how = "after a checkpoint" if after_checkpoint else "at random"
            found.append(f"kill {i + 1} ({how}, {at:.1f} s in): {_state(client)}")
        final = Driver(tmp_path, spec_path, uri)
        while final.watch():
            assert time.monotonic() - final.started < 600, "the final run did not end in 10 minutes"
            time.sleep(0.2)
        final.log.close()
        assert final.process.returncode == 0, (tmp_path / "driver.log").read_text()[-4000:]
        found.append(f"final run: {_state(client)}")
        left = {d.process.pid: d.alive_left() for d in killed if d.alive_left()}
        assert not left, f"processes of killed drivers still running: {left}"
        planned_check(client, tmp_path)
        # Through every kill and restore, each trial once, each epoch once, as MLflow holds them.
        assert_histories_match_mlflow(spec["name"], tmp_path / "sweeps")
        restored = [
            int(m.value)
            for child in _children(client)
            for m in client.get_metric_history(child.info.run_id, "restored_from_epoch")
        ]
        found.append(f"restores from a checkpoint: {len(restored)} (epochs {sorted(restored)})")
        found.append(f"checkpoint files at the end: {sorted(_checkpoint_times(sweep_dir))}")
    finally:
        for driver in killed:
            for pid in driver.alive_left():
                kill_tree(pid)
    return found


def _check_runs(client, epochs, expected):
    exp = client.get_experiment_by_name("stress")
    runs = client.search_runs([exp.experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status in ("RUNNING", "FAILED")]
    children = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    finished = [r for r in children if r.info.status == "FINISHED"]
    keys = [r.data.tags["sweeper.trial_key"] for r in finished]
    assert len(keys) == len(set(keys)) == expected, sorted(keys)
    for child in finished:
        for key in ("epoch", "test_acc", "ncc_acc/train/fc1"):
            steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, key))
            assert steps == list(range(1, epochs + 1)), (child.info.run_name, key, steps)
    return finished


def _seed() -> int:
    return int(os.environ.get("SWEEPER_STRESS_SEED") or time.time_ns() % 10**6)


def test_bundled_sweep_survives_driver_sigkills_at_random_instants(tmp_path):
    seed = _seed()
    print(f"SWEEPER_STRESS_SEED={seed} (set it to replay this run)")  # shown with a failure

    def planned(client, _):
        finished = _check_runs(client, GRID["train"]["epochs"], 4)
        assert sorted(r.info.run_name for r in finished) == [f"seed={s}" for s in range(4)]

    found = _stress(tmp_path, GRID, random.Random(seed), planned)
    print(f"\nbundled sweep, SWEEPER_STRESS_SEED={seed}:\n  " + "\n  ".join(found))


def test_searched_sweep_survives_driver_sigkills_at_random_instants(tmp_path):
    from optuna.trial import TrialState

    from sweeper.search import ORPHANED
    from tests.test_search import _studies

    seed = _seed()
    print(f"SWEEPER_STRESS_SEED={seed} (set it to replay this run)")  # shown with a failure

    def planned(client, tmp):
        finished = _check_runs(client, SEARCH["train"]["epochs"], 6)
        studies = _studies(f"sqlite:///{tmp / 'sweeps' / 'stress-search' / 'optuna.db'}")
        counted = {
            (name, t.number): t.state
            for name, study in studies.items()
            for t in study.trials
            if not t.user_attrs.get(ORPHANED)
        }
        assert len(counted) == 6 and set(counted.values()) == {TrialState.COMPLETE}, counted
        numbers = {(r.data.tags["sweeper.study"], int(r.data.tags["sweeper.study_trial"])) for r in finished}
        assert numbers == set(counted)

    found = _stress(tmp_path, SEARCH, random.Random(seed), planned)
    print(f"\nsearched sweep, SWEEPER_STRESS_SEED={seed}:\n  " + "\n  ".join(found))


def test_searched_sweep_killed_between_tunes_trial_table_and_searcher_state(tmp_path):
    """Tune writes its trial table, then the searcher's state. A kill between the two leaves the searcher's
    snapshot older: here it is rewound to before the first ask, with Tune's table holding trials to run
    again. Each cell must still end with exactly its budget of study trials and MLflow runs."""
    import pickle

    from sweeper.search import tune_trials_to_rerun

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(SEARCH))
    uri = mlflow_uri(tmp_path)
    tune = tmp_path / "sweeps" / SEARCH["name"] / "tune"
    driver = Driver(tmp_path, spec_path, uri)
    final = None
    try:
        while not (
            tune.exists() and list(tune.glob("searcher-state-*.pkl")) and tune_trials_to_rerun(str(tune))
        ):
            assert driver.watch() and time.monotonic() - driver.started < 240, "no trial in Tune's table"
            time.sleep(0.05)
        driver.kill()
        for state in tune.glob("searcher-state-*.pkl"):
            state.write_bytes(pickle.dumps({"live": {}}))
        final = Driver(tmp_path, spec_path, uri)
        while final.watch():
            assert time.monotonic() - final.started < 300, "the resumed run did not end in 5 minutes"
            time.sleep(0.2)
        final.log.close()
        assert final.process.returncode == 0, (tmp_path / "driver.log").read_text()[-4000:]
        _check_runs(MlflowClient(uri), SEARCH["train"]["epochs"], 6)
        from tests.test_search import _check_exact_budget

        _check_exact_budget(f"sqlite:///{tune.parent / 'optuna.db'}", uri, experiment="stress")
    finally:
        for pid in driver.alive_left() + (final.alive_left() if final else []):
            kill_tree(pid)
