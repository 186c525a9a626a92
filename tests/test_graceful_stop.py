"""Stopping a sweep with a signal (Ctrl-C, SLURM's SIGTERM) and resuming it, with a real local Ray and a
real SQLite MLflow store: the driver ends with one line naming `sweeper resume` and exit status 75 (no
traceback, no Tune advice), every running trial checkpointed the epoch it was in, and the resumed sweep
trains no epoch twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.services import kill_tree, mlflow_uri

pytestmark = pytest.mark.slow

EPOCHS = 150
SPEC = {
    "name": "stopped",
    "experiment": "graceful",
    "dataset": "gaussian",
    "data": {"gaussian": {"classes": 3, "dim": 6, "train_per_class": 60, "test_per_class": 20}},
    "model": {"mlp": {"depth": 3, "width": 16}},
    "train": {"epochs": EPOCHS, "batch_size": 32},
    # Regular checkpoints far apart: a stop that only kept these would re-train up to 75 epochs a trial.
    "checkpoint": {"every": 75},
    "resources": {"cpu": 1},
    "grid": {"seed": [0, 1, 2]},
}


def _driver(tmp_path, uri: str, verb: str, target: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "sweeper", verb, target, "--storage", str(tmp_path / "sweeps")]
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _epochs(client) -> dict[str, float]:
    exp = client.get_experiment_by_name("graceful")
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'trial'")
    return {r.data.tags["sweeper.trial_key"]: r.data.metrics.get("epoch", 0) for r in runs}


@pytest.mark.parametrize("signum,bundle", [(signal.SIGINT, 1), (signal.SIGTERM, 2)])
def test_a_signalled_sweep_stops_cleanly_and_resumes_without_training_an_epoch_twice(
    tmp_path, signum, bundle
):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC, "bundle": bundle}))
    uri = mlflow_uri(tmp_path)
    client = MlflowClient(uri)
    driver = _driver(tmp_path, uri, "run", str(spec_path))
    try:
        # Two trials well into training (not at a regular checkpoint's epoch), then the signal.
        deadline = time.monotonic() + 240
        while len([e for e in _epochs(client).values() if e >= 10]) < 2:
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "no two trials reached epoch 10 in 4 minutes"
            time.sleep(0.3)
        driver.send_signal(signum)
        out, err = driver.communicate(timeout=200)
    finally:
        kill_tree(driver.pid)
    assert driver.returncode == 75, (out[-2000:], err[-4000:])
    assert "Traceback" not in err and "Tuner.restore" not in err + out, err[-4000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped ({signal.Signals(signum).name}): ") and last.endswith(
        f"continue from their checkpoints with: sweeper resume stopped --storage {tmp_path / 'sweeps'}"
    ), last

    # Every trial that had started checkpointed exactly the epoch MLflow has last logged for it, and its
    # run stays RUNNING: what `resume` continues.
    stopped_at = _epochs(client)
    exp = client.get_experiment_by_name("graceful")
    runs = client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'trial'")
    running = {r.data.tags["sweeper.trial_key"] for r in runs if r.info.status == "RUNNING"}
    assert len(running) >= 2
    saved = {}
    for path in (tmp_path / "sweeps" / "stopped" / "checkpoints").glob("*.pt"):
        # A lone trial's file holds its state; a bundle's, each member's under its trial key.
        for name, state in torch.load(path, weights_only=True).items():
            saved[path.stem if name == "trial_state" else name] = int(state["epoch"])
    assert {k: saved[k] for k in running} == {k: int(stopped_at[k]) for k in running}
    assert all(0 < saved[k] < EPOCHS and saved[k] % 75 for k in running), saved

    resumed = _driver(tmp_path, uri, "resume", "stopped")
    try:
        out, err = resumed.communicate(timeout=400)
    finally:
        kill_tree(resumed.pid)
    assert resumed.returncode == 0, err[-4000:]
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    children = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    assert len(children) == 3
    for child in children:
        key = child.data.tags["sweeper.trial_key"]
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_acc")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (child.info.run_name, steps)
        restored = [m.value for m in client.get_metric_history(child.info.run_id, "restored_from_epoch")]
        # Continued from the epoch it stopped at: not one epoch trained twice.
        assert restored == ([saved[key]] if key in running else []), (child.info.run_name, restored)
    assert not (tmp_path / "sweeps" / "stopped" / "checkpoints" / "STOP").exists()
