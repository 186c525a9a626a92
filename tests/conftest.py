"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance per test module that runs sweeps in-process (``run_sweep`` reuses it).

    ``address="local"``: a new instance even when a ``ray start`` cluster is running on this machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
