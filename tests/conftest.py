"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance per test module that runs sweeps in-process (``run_sweep`` reuses it).

    ``address="local"``: a new instance even when a ``ray start`` cluster is running on this machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


ROOT = Path(__file__).resolve().parent.parent
STRAY = ("mlruns", "mlflow.db", "mlartifacts", "sweeps", "report")
"""What a store or sweep opened from the checkout's own folder would leave there (CI fails on any of it)."""


@pytest.fixture(autouse=True)
def checkout_left_as_found():
    """Fail the test that writes into the checkout, not CI after the whole suite: an MLflow experiment
    created without an artifact location keeps its artifacts in ``./mlruns`` of the working directory.
    (Under xdist a test running beside the culprit on the other worker may be named too.)"""
    before = {name for name in STRAY if (ROOT / name).exists()}
    yield
    left = sorted(name for name in STRAY if (ROOT / name).exists() and name not in before)
    assert not left, f"the test left {left} in the checkout"
