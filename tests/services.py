"""Real services for integration tests, started on loopback and stopped by PID: PostgreSQL (run as the
``postgres`` user, since it refuses root) and helpers to kill a process tree."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import psutil

_MLFLOW_TEMPLATE: str | None = None


def mlflow_uri(folder) -> str:
    """A SQLite MLflow store in ``folder``, copied from one created (and migrated) once per test run:
    creating a store runs MLflow's schema migrations, about 3.5 s per sweep test on 2 cores."""
    global _MLFLOW_TEMPLATE
    if _MLFLOW_TEMPLATE is None:
        from mlflow.tracking import MlflowClient

        template = os.path.join(tempfile.mkdtemp(prefix="sweeper-mlflow-"), "mlflow.db")
        MlflowClient(f"sqlite:///{template}").search_experiments()
        _MLFLOW_TEMPLATE = template
    target = os.path.join(str(folder), "mlflow.db")
    shutil.copyfile(_MLFLOW_TEMPLATE, target)
    return f"sqlite:///{target}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    return found


def postgres_available() -> bool:
    return _pg_bin("initdb") is not None and _pg_bin("pg_ctl") is not None


def _as_postgres(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", "postgres", "--", *args]


@contextmanager
def postgres_server():
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>; yields its SQLAlchemy URL."""
    base = tempfile.mkdtemp(prefix="sweeper-pg-")
    data = os.path.join(base, "data")
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    port = free_port()
    subprocess.run(
        _as_postgres([_pg_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        _as_postgres(
            [
                _pg_bin("pg_ctl"),
                "-D",
                data,
                "-l",
                os.path.join(base, "log"),
                "-w",
                "-o",
                f"-h 127.0.0.1 -p {port} -k {base}",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    pid = int(open(os.path.join(data, "postmaster.pid")).readline())
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        try:
            os.kill(pid, signal.SIGINT)  # fast shutdown of the postmaster we started
            psutil.Process(pid).wait(timeout=30)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def s3_server():
    """A local S3-compatible object store (moto's standalone HTTP server) on 127.0.0.1:<free port>; yields
    the ``host:port`` endpoint. Clients talk to it over the real S3 REST protocol."""
    port = free_port()
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        up = wait_for(lambda: _port_open(port), timeout=60, interval=0.2)
        assert up, "moto_server did not start"
        yield f"127.0.0.1:{port}"
    finally:
        kill_tree(proc.pid)


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200 (a server's health endpoint)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def mlflow_server(store: str, folder):
    """A real ``mlflow server`` on 127.0.0.1:<free port> over the backend ``store``, artifacts under
    ``folder``; yields its URI and stops it by PID."""
    port = free_port()
    command = [
        os.path.join(os.path.dirname(sys.executable), "mlflow"),
        "server",
        "--backend-store-uri",
        store,
    ]
    command += ["--host", "127.0.0.1", "--port", str(port), "--artifacts-destination", f"{folder}/artifacts"]
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        if not wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/health"), timeout=180):
            raise RuntimeError("mlflow server did not come up")
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_tree(server.pid)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (a sweep driver and the Ray processes it started)."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
