"""Kill anything, lose nothing: a trial's worker killed mid-trial continues from its checkpoint, checked
through MlflowClient against a real local Ray and SQLite store. The driver SIGKILLed at random instants is
tests/test_kill_stress.py."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests.services import kill_tree, mlflow_uri, wait_for

pytestmark = pytest.mark.slow

SPEC = """
name: faults
experiment: faults-test
dataset: gaussian
data: {{gaussian: {{classes: 3, dim: 6, train_per_class: 30, test_per_class: 10}}}}
model: {{mlp: {{depth: 3, width: 8}}}}
train: {{epochs: {epochs}, batch_size: 32}}
checkpoint: {{every: {every}}}
grid:
  seed: {seeds}
resources: {{cpu: 1}}
max_failures: 3
bundle: {bundle}
max_concurrent: {concurrent}
"""


def _children(client):
    exp = client.get_experiment_by_name("faults-test")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'trial'")


def _driver(tmp_path, uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "sweeper", "run", "spec.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _check_exactly_once(client, planned, epochs):
    children = _children(client)
    assert sorted(c.info.run_name for c in children) == sorted(planned)
    for child in children:
        assert child.info.status == "FINISHED", child.info.run_name
        for key in ("epoch", "test_acc", "ncc_acc/train/fc1"):
            steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, key))
            assert steps == list(range(1, epochs + 1)), (child.info.run_name, key, steps)
    exp = client.get_experiment_by_name("faults-test")
    runs = client.search_runs([exp.experiment_id])
    assert len([r for r in runs if r.data.tags.get("sweeper.role") == "parent"]) == 1
    assert not [r for r in runs if r.info.status == "RUNNING"]
    return children


def test_worker_killed_mid_trial_continues_from_checkpoint(tmp_path):
    """The trial is a bundle of two seeds: both members continue from their slices of its checkpoint."""
    epochs, every = 45, 15
    (tmp_path / "spec.yaml").write_text(
        SPEC.format(epochs=epochs, every=every, seeds="[0, 1]", bundle=2, concurrent=1)
    )
    uri = mlflow_uri(tmp_path)
    client = MlflowClient(uri)
    driver = _driver(tmp_path, uri)
    try:
        assert wait_for(
            lambda: any(c.data.metrics.get("epoch", 0) >= every + 5 for c in _children(client)),
            timeout=300,
            interval=0.2,
        )
        workers = [
            p
            for p in psutil.Process(driver.pid).children(recursive=True)
            if "ImplicitFunc" in " ".join(p.cmdline()) or "run_trial" in " ".join(p.cmdline())
        ]
        assert workers, "no trial worker process found"
        for worker in workers:
            worker.kill()
        out, _ = driver.communicate(timeout=600)
    finally:
        kill_tree(driver.pid)
    assert driver.returncode == 0, out[-4000:]
    for child in _check_exactly_once(client, ["seed=0", "seed=1"], epochs):
        restored = [m.value for m in client.get_metric_history(child.info.run_id, "restored_from_epoch")]
        assert restored and all(r > 0 and r % every == 0 for r in restored), restored
