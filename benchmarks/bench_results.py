"""A sweep's histories into a DataFrame: ``sweeper.results.load_histories`` (bulk reads) against the
per-key loop MLflow's client offers (``get_metric_history`` for every run and key), in one run.

The sweep is simulated at the issue's size: 100 trials x 300 epochs x the real key set of seed 000's MLP
(one real epoch of the trainer gives the keys: 110 plus the ``epoch`` sentinel). Runs, tags and params are
made through MLflow's client as a sweep makes them; the 3.3 million metric rows are written straight into
the store's own ``metrics`` and ``latest_metrics`` tables (SQLite's executemany, PostgreSQL's COPY), since
logging them through the API would take longer than everything measured here. Each backend is read three
ways: the database directly (a ``sqlite:///`` or ``postgresql://`` tracking URI), through a real ``mlflow
server`` on that database (its bulk history endpoint), and key by key through the client on the database.
Every way must give the same rows; the script stops if one does not.

Run: ``python benchmarks/bench_results.py [--trials 100] [--epochs 300] [--backends sqlite,postgresql]``;
``--quick`` is the CI-sized form (4 trials x 5 epochs). Nothing is asserted about times.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' real-service helpers, and this checkout's sweeper


def seed000_keys() -> list[str]:
    """The metric keys one epoch of seed 000's MLP logs (a real trainer epoch on small MNIST-format data)."""
    from bench_speed import trial_config, write_mnist

    from trainables.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(trial_config(write_mnist(Path(tmp), 600, 200)))
        trainer.train_epoch()
        return sorted(trainer.end_epoch(0.0, 0.05, time.perf_counter()))


def make_sweep(uri: str, folder: Path, trials: int, epochs: int, keys: list[str]) -> str:
    """Runs tagged as a sweep's trials, their histories in the store; returns the sweep id."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from sweeper.tracking import SENTINEL, TAG_CELL, TAG_ORDER, TAG_ROLE, TAG_SWEEP, TAG_TRIAL

    client = MlflowClient(uri)
    exp = client.create_experiment(f"bench-{uuid.uuid4().hex[:6]}", artifact_location=folder.as_uri())
    sweep_id = uuid.uuid4().hex
    runs = []
    for i in range(trials):
        depth, seed = i % 5, i // 5
        run = client.create_run(
            exp,
            run_name=f"etf.depth={depth} seed={seed}",
            tags={
                TAG_SWEEP: sweep_id,
                TAG_ROLE: "trial",
                TAG_TRIAL: f"t{i:03d}",
                TAG_CELL: f"etf.depth={depth}",
                TAG_ORDER: f"{i:06d}",
            },
        )
        params = [
            Param("seed", str(seed)),
            Param("etf.depth", str(depth)),
            Param("train.epochs", str(epochs)),
        ]
        client.log_batch(run.info.run_id, params=params)
        client.set_terminated(run.info.run_id, "FINISHED")
        runs.append(run.info.run_id)
    rng = random.Random(0)
    start = int(time.time() * 1000)
    rows = [
        (key, float(epoch) if key == SENTINEL else rng.random(), start + epoch, run, epoch)
        for run in runs
        for epoch in range(1, epochs + 1)
        for key in [*keys, SENTINEL]
    ]
    latest = [row for row in rows if row[4] == epochs]
    _insert(uri, rows, latest)
    return sweep_id


def _insert(uri: str, rows: list[tuple], latest: list[tuple]) -> None:
    if uri.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(uri[len("sqlite:///") :]) as conn:
            for table, data in (("metrics", rows), ("latest_metrics", latest)):
                conn.executemany(
                    f"INSERT INTO {table} (key, value, timestamp, run_uuid, step, is_nan) "
                    "VALUES (?, ?, ?, ?, ?, 0)",
                    data,
                )
        return
    import sqlalchemy as sa

    engine = sa.create_engine(uri)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for table, data in (("metrics", rows), ("latest_metrics", latest)):
            text = io.StringIO("".join(f"{k}\t{v!r}\t{t}\t{r}\t{s}\tf\n" for k, v, t, r, s in data))
            cursor.copy_expert(
                f"COPY {table} (key, value, timestamp, run_uuid, step, is_nan) FROM STDIN", text
            )
        raw.commit()
    finally:
        raw.close()
        engine.dispose()


def per_key_loop(uri: str, sweep: str, storage: Path):
    """What a notebook does with MLflow's client alone: one request per run and key."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from sweeper.results import load_trials

    client = MlflowClient(uri)
    rows = []
    for run_id in load_trials(sweep, storage)["run_id"]:
        for key in client.get_run(run_id).data.metrics:
            rows += [(run_id, key, m.step, m.value) for m in client.get_metric_history(run_id, key)]
    return pd.DataFrame(rows, columns=["run_id", "key", "epoch", "value"])


def write_sweep_dir(storage: Path, name: str, sweep_id: str, uri: str) -> None:
    (storage / name).mkdir(parents=True)
    (storage / name / "sweep.json").write_text(
        json.dumps({"name": name, "sweep_id": sweep_id, "tracking_uri": uri})
    )


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _signature(frame) -> tuple[int, float]:
    return len(frame), round(float(frame["value"].sum()), 6)


def bench_backend(backend: str, trials: int, epochs: int, keys: list[str], per_key: bool) -> list[dict]:
    from sweeper.results import load_histories
    from sweeper.tracking import SENTINEL
    from tests.services import mlflow_server, mlflow_uri, postgres_server

    rows = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        folder = Path(tmp)
        uri = mlflow_uri(folder) if backend == "sqlite" else stack.enter_context(postgres_server())
        made, sweep_id = _timed(lambda: make_sweep(uri, folder / "artifacts", trials, epochs, keys))
        print(f"{backend}: {trials} trials x {epochs} epochs x {len(keys) + 1} keys written in {made:.1f} s")
        storage = folder / "sweeps"
        write_sweep_dir(storage, "direct", sweep_id, uri)
        seconds, direct = _timed(lambda: load_histories("direct", storage))
        rows.append({"backend": backend, "way": "load_histories, the database directly", "s": seconds})
        expected = _signature(direct)
        server = stack.enter_context(mlflow_server(uri, tmp))
        write_sweep_dir(storage, "server", sweep_id, server)
        seconds, served = _timed(lambda: load_histories("server", storage))
        rows.append({"backend": backend, "way": "load_histories, through mlflow server", "s": seconds})
        if per_key:
            seconds, looped = _timed(lambda: per_key_loop(uri, "direct", storage))
            looped = looped[looped["key"] != SENTINEL]
            rows.append({"backend": backend, "way": "get_metric_history per run and key", "s": seconds})
            if _signature(looped) != expected:
                raise SystemExit(f"{backend}: the per-key loop read {_signature(looped)}, bulk {expected}")
        if _signature(served) != expected:
            raise SystemExit(f"{backend}: the server read {_signature(served)}, the database {expected}")
        for row in rows:
            row["values"] = expected[0]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--no-per-key", action="store_true", help="skip the slow per-key loop")
    parser.add_argument("--quick", action="store_true", help="CI size: 4 trials x 5 epochs")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs = 4, 5
    from tests.services import postgres_available

    backends = [b for b in args.backends.split(",") if b != "postgresql" or postgres_available()]
    keys = seed000_keys()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    rows = [
        row
        for backend in backends
        for row in bench_backend(backend, args.trials, args.epochs, keys, not args.no_per_key)
    ]
    print("\n| backend | way | values | s | values/s | vs bulk |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        bulk = next(r["s"] for r in rows if r["backend"] == row["backend"])
        print(
            f"| {row['backend']} | {row['way']} | {row['values']:,} | {row['s']:.2f} | "
            f"{row['values'] / row['s']:,.0f} | {row['s'] / bulk:.1f}x |"
        )


if __name__ == "__main__":
    main()
