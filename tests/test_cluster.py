"""The docker-compose stack, validated, and the same commands it runs as real local processes: a
Postgres-backed `mlflow server`, a `ray start` head and worker; a sweep on that 2-node cluster lands trials
on both nodes and survives the tracking server restarting mid-sweep."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.services import free_port, http_ok, kill_tree, postgres_available, postgres_server, wait_for

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
def test_compose_file_is_valid():
    proc = subprocess.run(
        ["docker-compose", "--env-file", ".env.example", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_compose_file_binds_loopback_pins_images_and_reserves_gpus():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (name, port)
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), (name, image)
    for name in ("postgres", "mlflow", "ray-head"):
        assert "healthcheck" in services[name], name
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    example = (ROOT / ".env.example").read_text()
    for variable in ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN", "BIND_ADDRESS"):
        assert f"{variable}=" in example


def _start(args, env, log):
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


SPEC = """
name: cluster
experiment: cluster-test
dataset: gaussian
data: {gaussian: {classes: 3, dim: 6, train_per_class: 30, test_per_class: 10}}
model: {mlp: {depth: 3, width: 8}}
train: {epochs: 25, batch_size: 32}
checkpoint: {every: 5}
grid:
  seed: [0, 1, 2, 3]
resources: {cpu: 1}
"""


@pytest.mark.slow
@pytest.mark.skipif(not postgres_available(), reason="PostgreSQL binaries not installed")
def test_two_node_cluster_and_tracking_server_restart(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    ray_port, mlflow_port = free_port(), free_port()
    log = open(tmp_path / "services.log", "ab")
    started = []
    with postgres_server() as pg_url:
        server_cmd = [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            pg_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ]
        health = f"http://127.0.0.1:{mlflow_port}/health"
        try:
            started.append(_start(server_cmd, env, log))
            node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--block"]
            started.append(
                _start(
                    [
                        str(BIN / "ray"),
                        "start",
                        "--head",
                        "--port",
                        str(ray_port),
                        "--include-dashboard",
                        "false",
                        *node,
                    ],
                    env,
                    log,
                )
            )
            assert wait_for(lambda: http_ok(health), timeout=120), "mlflow server did not come up"
            time.sleep(5)  # the head's GCS must be up before the worker joins
            started.append(
                _start([str(BIN / "ray"), "start", "--address", f"127.0.0.1:{ray_port}", *node], env, log)
            )

            (tmp_path / "spec.yaml").write_text(SPEC)
            uri = f"http://127.0.0.1:{mlflow_port}"
            driver = subprocess.Popen(
                [sys.executable, "-m", "sweeper", "run", "spec.yaml", "--address", f"127.0.0.1:{ray_port}"],
                cwd=tmp_path,
                env={**env, "MLFLOW_TRACKING_URI": uri},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            client = MlflowClient(uri)

            def some_epochs_logged():
                exp = client.get_experiment_by_name("cluster-test")
                if exp is None:
                    return False
                runs = client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'trial'")
                return any(r.data.metrics.get("epoch", 0) >= 5 for r in runs)

            assert wait_for(some_epochs_logged, timeout=300), "no trial logged 5 epochs"
            kill_tree(started[0].pid)  # the tracking server goes away mid-sweep ...
            time.sleep(4)
            started[0] = _start(server_cmd, env, log)  # ... and comes back on the same port
            assert wait_for(lambda: http_ok(health), timeout=120)
            out, _ = driver.communicate(timeout=600)
            assert driver.returncode == 0, out[-4000:]
            assert "4 finished, 0 failed" in out

            exp = client.get_experiment_by_name("cluster-test")
            children = client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'trial'")
            assert len(children) == 4
            for child in children:
                assert child.info.status == "FINISHED"
                for key in ("epoch", "test_acc", "ncc_acc/train/fc2"):
                    steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
                    assert sorted(steps) == list(range(1, 26)), (key, steps)
            assert len({c.data.tags["sweeper.node"] for c in children}) == 2, "trials did not use both nodes"
        finally:
            for proc in reversed(started):
                kill_tree(proc.pid)
            log.close()
