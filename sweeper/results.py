"""Sweeps' results as pandas DataFrames, for notebooks and ``sweeper export``.

``load_histories`` gives one tidy row per (trial, epoch, metric, split, layer) with the trial's sweep,
variant, seed, varying config values and status; ``load_trials`` one row per trial with its outcome and
headline numbers (004 §5.3's test accuracy at the interpolation threshold, at the end and at the best
epoch). Histories are read in bulk, never one request per key: straight from the store's ``metrics`` table
for a database URI (SQLite, PostgreSQL, MySQL), through the server's bulk history endpoint (the one its UI
uses) for an ``http(s)://`` tracking server, and key by key only for other stores (a ``./mlruns`` folder).

A trial is its trial key: one row however many Tune experiments, retries and resumes it ran through. An
epoch counts once its ``epoch`` sentinel is logged (the sentinel is the last metric of an epoch's batch),
and a metric row logged twice for one step (a retried request after an outage) appears once, the later.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from sweeper.location import Location
from sweeper.report import resolve_sweep_dir
from sweeper.tracking import (
    SENTINEL,
    TAG_CELL,
    TAG_FAILURE,
    TAG_ORDER,
    TAG_ROLE,
    TAG_STUDY,
    TAG_STUDY_TRIAL,
    TAG_SWEEP,
    TAG_TRIAL,
)

HEADLINE = (
    "test_acc_at_best_epoch",
    "test_acc_at_end",
    "test_acc_at_interpolation",
    "best_epoch",
    "interpolation_epoch",
)
"""What ``TrialTracker.finish`` logs once at step 0: columns of the trials table, not histories."""
EVENTS = ("restored_from_epoch",)
"""Logged once per event, not per epoch (two restores from epoch 5 are two points at step 5): not
histories. A trial's restores are in MLflow."""
SPLITS = ("train", "test")
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
BULK_ENDPOINT = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"
BULK_MAX_RUNS = 100  # the server's limits per bulk request (mlflow/server/handlers.py)
BULK_MAX_RESULTS = 25_000
FEW_KEYS = 32  # up to this many keys of a run, the database filters them (its (run, key, step) index)


@dataclass(frozen=True)
class SweepRef:
    """One sweep to read: its directory, ``sweep.json`` and its name."""

    location: Location
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.meta["name"]


def open_sweeps(sweeps: str | Path | Iterable[str | Path], storage: str | Path = "sweeps") -> list[SweepRef]:
    """Sweep names under ``storage``, sweep directories or ``s3://`` URIs, each read once."""
    if isinstance(sweeps, (str, Path)):
        sweeps = [sweeps]
    refs: dict[str, SweepRef] = {}
    for sweep in sweeps:
        location = resolve_sweep_dir(str(sweep), storage)
        meta = json.loads(location.read_text("sweep.json"))
        refs.setdefault(meta["sweep_id"], SweepRef(location, meta))
    if not refs:
        raise ValueError("no sweep given")
    return list(refs.values())


def _trial_runs(client: MlflowClient, sweep_id: str) -> list[Any]:
    """The child runs of a sweep, one per trial key (FINISHED first, then the latest started)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiments,
            filter_string=f"tags.`{TAG_SWEEP}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'trial'",
            max_results=10_000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            break
    by_key: dict[str, Any] = {}
    for run in runs:
        key = run.data.tags.get(TAG_TRIAL, run.info.run_id)
        rank = (run.info.status == "FINISHED", run.info.start_time or 0)
        held = by_key.get(key)
        if held is None or rank > (held.info.status == "FINISHED", held.info.start_time or 0):
            by_key[key] = run
    return sorted(by_key.values(), key=lambda r: (r.data.tags.get(TAG_ORDER, ""), r.info.run_name or ""))


def _param(text: str) -> Any:
    """A param as the trial config held it (MLflow keeps ``str(value)``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, str)) or value is None else text


def _trials_of(ref: SweepRef) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """One sweep's trials table (every param as a column) and each run's metric keys."""
    client = MlflowClient(ref.meta["tracking_uri"])
    rows, keys = [], {}
    for run in _trial_runs(client, ref.meta["sweep_id"]):
        tags, metrics = run.data.tags, run.data.metrics
        keys[run.info.run_id] = list(metrics)
        row = {
            "sweep": ref.name,
            "variant": tags.get(TAG_CELL, "all"),
            "status": run.info.status,
            "epochs": int(metrics.get(SENTINEL, 0)),
            **{k: metrics.get(k) for k in HEADLINE},
            "trial": tags.get(TAG_TRIAL),
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "failure": tags.get(TAG_FAILURE),
            "study": tags.get(TAG_STUDY),
            "study_trial": int(tags[TAG_STUDY_TRIAL]) if TAG_STUDY_TRIAL in tags else None,
            "sweep_id": ref.meta["sweep_id"],
            "tracking_uri": ref.meta["tracking_uri"],
        }
        row.update({f"param:{k}": _param(v) for k, v in run.data.params.items()})
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.astype({k: "float64" for k in HEADLINE})
    return table, keys


def _with_varying_params(table: pd.DataFrame) -> pd.DataFrame:
    """Keep the params that vary over the trials (and the seed) as columns named by their dotted path,
    right after ``variant``."""
    params = [c for c in table.columns if c.startswith("param:")]
    varying = [c for c in params if c == "param:seed" or table[c].astype(str).nunique(dropna=False) > 1]
    named = table.drop(columns=[c for c in params if c not in varying]).rename(
        columns={c: c[len("param:") :] for c in varying}
    )
    order = ["sweep", "variant", *[c[len("param:") :] for c in varying]]
    return named[order + [c for c in named.columns if c not in order]]


def load_trials(sweeps: str | Path | Iterable[str | Path], storage: str | Path = "sweeps") -> pd.DataFrame:
    """One row per trial of the given sweeps: sweep, variant (its grid cell), seed and the config values
    that vary, status, complete epochs, headline numbers, trial key, MLflow run id and name, failure reason,
    and for searched sweeps the Optuna study and trial number."""
    # The tracking URI stays inside: a database URI may hold a password.
    return _load(open_sweeps(sweeps, storage))[0].drop(columns="tracking_uri")


def _load(refs: list[SweepRef]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    tables, keys = [], {}
    for ref in refs:
        table, run_keys = _trials_of(ref)
        tables.append(table)
        keys.update(run_keys)
    table = (
        pd.concat([t for t in tables if not t.empty], ignore_index=True)
        if any(not t.empty for t in tables)
        else pd.DataFrame(columns=["sweep", "variant", "status", "trial", "run_id"])
    )
    return _with_varying_params(table), keys


def split_key(key: str) -> tuple[str, str | None, str | None]:
    """A metric key as (metric, split, layer): ``nc1/train/fc2`` -> (nc1, train, fc2), ``test_acc`` ->
    (acc, test, None), ``etf_fixed_epoch/fc3`` -> (etf_fixed_epoch, None, fc3), ``lr`` -> (lr, None, None)."""
    parts = key.split("/")
    if len(parts) == 3 and parts[1] in SPLITS:
        return parts[0], parts[1], parts[2]
    if len(parts) == 1:
        head, _, tail = key.partition("_")
        if head in SPLITS and tail in ("acc", "loss"):
            return tail, head, None
    if len(parts) == 2 and parts[0] == "etf_fixed_epoch":
        return parts[0], None, parts[1]
    return key, None, None


def _wanted(key: str, metrics, splits, layers) -> bool:
    if key in HEADLINE or key in EVENTS or key == SENTINEL:
        return False
    metric, split, layer = split_key(key)
    return (
        (metrics is None or metric in metrics or key in metrics)
        and (splits is None or split in splits)
        and (layers is None or layer in layers)
    )


def _as_set(value: str | Sequence[str] | None) -> set[str] | None:
    return None if value is None else {value} if isinstance(value, str) else set(value)


def load_histories(
    sweeps: str | Path | Iterable[str | Path],
    storage: str | Path = "sweeps",
    *,
    metrics: str | Sequence[str] | None = None,
    splits: str | Sequence[str] | None = None,
    layers: str | Sequence[str] | None = None,
    epochs: tuple[int, int] | Sequence[int] | None = None,
    status: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Every logged epoch of every trial of the given sweeps, one row per (trial, epoch, metric, split,
    layer): the trials table's sweep, variant, seed and varying config values, status, trial key and run
    id, then ``epoch``, ``key`` (the MLflow key), ``metric``, ``split``, ``layer`` and ``value``.

    Filters, so a notebook reads only what it plots: ``metrics`` (names such as ``nc1`` or ``acc``, or
    whole keys), ``splits`` (``train``/``test``), ``layers`` (tap names), ``epochs`` (an inclusive
    ``(first, last)`` pair or a list), ``status`` (e.g. ``"FINISHED"``)."""
    trials, keys = _load(open_sweeps(sweeps, storage))
    if status is not None:
        trials = trials[trials["status"].isin(_as_set(status))]
    metric_set, split_set, layer_set = _as_set(metrics), _as_set(splits), _as_set(layers)
    frames = []
    for uri, group in trials.groupby("tracking_uri", sort=False):
        wanted = {
            run_id: [k for k in keys[run_id] if _wanted(k, metric_set, split_set, layer_set)]
            for run_id in group["run_id"]
        }
        frames.append(read_metric_rows(uri, wanted, epochs))
    columns = [c for c in trials.columns if c not in ("tracking_uri", "sweep_id", "failure", "run_name")]
    columns = [
        c for c in columns if c not in HEADLINE and c not in ("epochs", "study", "study_trial", "run_id")
    ]
    # Assembled from integer codes (trial position, key index): four million rows take a second, where
    # merging on strings took ten.
    names = sorted({k for f in frames for k in f["key"].cat.categories})
    plan = pd.Index(trials["run_id"])
    at, key, epoch, value = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], []
    for f in frames:
        at.append(plan.get_indexer(f["run_id"].cat.categories)[f["run_id"].cat.codes])
        key.append(pd.Index(names).get_indexer(f["key"].cat.categories)[f["key"].cat.codes])
        epoch.append(f["epoch"].to_numpy(np.int64))
        value.append(f["value"].to_numpy(np.float64))
    at, key, epoch = np.concatenate(at), np.concatenate(key), np.concatenate(epoch)
    value = np.concatenate(value) if value else np.zeros(0, np.float64)
    order = np.lexsort((epoch, key, at))  # the trials table's order (the plan's), then key and epoch
    at, key, epoch, value = at[order], key[order], epoch[order], value[order]
    out: dict[str, Any] = {}
    for column in columns:
        if column in ("sweep", "variant", "status", "trial"):
            codes = pd.Categorical(trials[column])
            out[column] = pd.Categorical.from_codes(codes.codes[at], categories=codes.categories)
        else:
            out[column] = trials[column].iloc[at].to_numpy()
    out["run_id"] = pd.Categorical.from_codes(at, categories=plan)
    out["epoch"] = epoch
    out["key"] = pd.Categorical.from_codes(key, categories=names)
    parts = [split_key(k) for k in names]
    for i, part in enumerate(("metric", "split", "layer")):
        codes = pd.Categorical([p[i] for p in parts])
        out[part] = pd.Categorical.from_codes(codes.codes[key], categories=codes.categories)
    out["value"] = value
    return pd.DataFrame(out)


def _empty_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": pd.Categorical([]),
            "key": pd.Categorical([]),
            "epoch": np.zeros(0, np.int64),
            "value": np.zeros(0, np.float64),
        }
    )


def read_metric_rows(
    uri: str, keys: dict[str, list[str]], epochs: tuple[int, int] | Sequence[int] | None = None
) -> pd.DataFrame:
    """``run_id, key, epoch, value`` of the given runs' keys, complete epochs only, each step once;
    ``run_id`` and ``key`` as categoricals (keys in sorted order)."""
    with_sentinel = {run: sorted({*ks, SENTINEL}) for run, ks in keys.items() if ks}
    if not with_sentinel:
        return _empty_rows()
    runs = list(with_sentinel)
    names = sorted({k for ks in with_sentinel.values() for k in ks})
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    if scheme in SQL_SCHEMES:
        rows = _rows_from_database(uri, with_sentinel, names)
    elif scheme in ("http", "https"):
        rows = _coded(_rows_from_server(uri, with_sentinel), runs, names)
    else:
        rows = _coded(_rows_key_by_key(uri, with_sentinel), runs, names)
    return _complete_epochs(rows, runs, names, epochs)


Rows = dict[str, np.ndarray]
"""Metric rows as parallel arrays: ``run`` and ``key`` (indices into the run and key lists), ``step``,
``value`` (NaN where MLflow's ``is_nan``) and, where a point may be there twice, ``timestamp``. Strings
once per run and key, not per row:
a sweep of 100 trials x 300 epochs holds four million rows."""


def _coded(frame: pd.DataFrame, runs: list[str], names: list[str]) -> Rows:
    run = pd.Categorical(frame["run_id"], categories=runs).codes.astype(np.int64)
    key = pd.Categorical(frame["key"], categories=names).codes.astype(np.int64)
    keep = (run >= 0) & (key >= 0)
    return {
        "run": run[keep],
        "key": key[keep],
        "step": frame["step"].to_numpy(np.int64)[keep],
        "value": frame["value"].to_numpy(np.float64)[keep],
        "timestamp": frame["timestamp"].to_numpy(np.int64)[keep],
    }


def _complete_epochs(
    rows: Rows, runs: list[str], names: list[str], epochs: tuple[int, int] | Sequence[int] | None
) -> pd.DataFrame:
    """Each (run, key, step) once, the latest logged (a retried request may have logged a step twice
    with another timestamp), at the steps the run's ``epoch`` sentinel reached, as a DataFrame."""
    run, key, step, value = rows["run"], rows["key"], rows["step"], rows["value"]
    steps = int(step.max()) + 2 if len(step) else 1
    if "timestamp" in rows:  # else each point is there once already
        point = (run * len(names) + key) * steps + (step + 1)
        order = np.lexsort((rows["timestamp"], point))
        last = np.r_[point[order][1:] != point[order][:-1], True]  # the latest row of each point
        chosen = order[last]
        run, key, step, value = run[chosen], key[chosen], step[chosen], value[chosen]
    sentinel = names.index(SENTINEL)
    complete = np.unique(run[key == sentinel] * steps + (step[key == sentinel] + 1))
    keep = (key != sentinel) & np.isin(run * steps + (step + 1), complete)
    if epochs is not None:
        if isinstance(epochs, tuple) and len(epochs) == 2:
            keep &= (step >= epochs[0]) & (step <= epochs[1])
        else:
            keep &= np.isin(step, np.asarray(list(epochs), dtype=np.int64))
    return pd.DataFrame(
        {
            "run_id": pd.Categorical.from_codes(run[keep], categories=runs),
            "key": pd.Categorical.from_codes(key[keep], categories=names),
            "epoch": step[keep],
            "value": value[keep],
        }
    )


def _rows_from_database(uri: str, keys: dict[str, list[str]], names: list[str]) -> Rows:
    """MLflow's ``metrics`` table (what ``get_metric_history`` reads, with its NaN convention: ``is_nan``
    rows hold 0), one query per run on its ``run_uuid`` index, through the driver's own cursor: four
    million rows in about 3 s on 2 cores, where SQLAlchemy's row objects took 40 s. Timestamps are read
    only for a run that holds a step twice (a retried request), to keep the later."""
    import sqlalchemy as sa

    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
    mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    index = {name: i for i, name in enumerate(names)}
    select = (
        "SELECT key, step, CASE WHEN is_nan THEN NULL ELSE value END{} FROM metrics WHERE run_uuid = " + mark
    )
    parts: list[tuple[np.ndarray, ...]] = []
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()

        def fetch(run: str, run_keys: list[str], timestamps: bool = False) -> list[tuple]:
            query = select.format(", timestamp" if timestamps else "")
            if len(run_keys) <= FEW_KEYS:  # a notebook's filter: let the (run, key, step) index pick them
                query += f" AND key IN ({', '.join([mark] * len(run_keys))})"
                cursor.execute(query, (run, *run_keys))
            else:  # most of the run: unwanted keys are dropped below, cheaper than asking the database
                cursor.execute(query, (run,))
            return cursor.fetchall()

        for number, (run, run_keys) in enumerate(keys.items()):
            found = fetch(run, run_keys)
            for timestamps in (False, True):
                if timestamps:  # a point logged twice: read again, in the order it was logged
                    found = sorted(fetch(run, run_keys, timestamps=True), key=lambda r: r[3])
                key = pd.Categorical([r[0] for r in found], categories=names).codes.astype(np.int64)
                numbers = np.array([r[1:3] for r in found], dtype=np.float64).reshape(-1, 2)
                step = numbers[:, 0].astype(np.int64)
                point = key * (int(step.max(initial=0)) + 2) + step + 1
                _, last = np.unique(point[::-1], return_index=True)  # the later of a point's rows
                if len(last) == len(point):
                    break
            keep = np.zeros(len(point), bool)
            keep[len(point) - 1 - last] = True
            keep &= np.isin(key, [index[k] for k in run_keys])
            parts.append((np.full(keep.sum(), number), key[keep], step[keep], numbers[keep, 1]))
        cursor.close()
    finally:
        raw.close()
        engine.dispose()
    run, key, step, value = (np.concatenate([p[i] for p in parts]) for i in range(4))
    return {"run": run, "key": key, "step": step, "value": value}


def _rows_from_server(uri: str, keys: dict[str, list[str]]) -> pd.DataFrame:
    """The tracking server's bulk history endpoint: one request per key and group of runs (at most 100
    runs and 25,000 points a request), several in flight."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    client = MlflowClient(uri)
    steps = {}
    for run in keys:  # the sentinel's last value is the run's last epoch: bounds its points per key
        latest = client.get_run(run).data.metrics.get(SENTINEL, 0)
        steps[run] = int(latest) + 1
    requests = []
    for key in sorted({k for ks in keys.values() for k in ks}):
        runs = [r for r, ks in keys.items() if key in ks]
        chunk: list[str] = []
        points = 0
        for run in runs:
            if chunk and (len(chunk) == BULK_MAX_RUNS or points + steps[run] > BULK_MAX_RESULTS):
                requests.append((key, chunk))
                chunk, points = [], 0
            chunk.append(run)
            points += steps[run]
        if chunk:
            requests.append((key, chunk))

    def fetch(request: tuple[str, list[str]]) -> list[dict[str, Any]]:
        key, runs = request
        response = http_request(
            creds,
            BULK_ENDPOINT,
            "GET",
            params={"run_id": runs, "metric_key": key, "max_results": BULK_MAX_RESULTS},
        )
        response.raise_for_status()
        found = response.json().get("metrics", [])
        if len(found) >= BULK_MAX_RESULTS:  # more points than the sentinel said: read these runs one by one
            return [
                {"run_id": r, "key": key, "step": m.step, "value": m.value, "timestamp": m.timestamp}
                for r in runs
                for m in client.get_metric_history(r, key)
            ]
        return found

    with ThreadPoolExecutor(max_workers=8) as pool:
        found = [m for batch in pool.map(fetch, requests) for m in batch]
    frame = pd.DataFrame(found, columns=["run_id", "key", "step", "value", "timestamp"])
    return frame.astype({"value": "float64"})


def _rows_key_by_key(uri: str, keys: dict[str, list[str]]) -> pd.DataFrame:
    client = MlflowClient(uri)
    found = [
        (run, key, m.step, m.value, m.timestamp)
        for run, run_keys in keys.items()
        for key in run_keys
        for m in client.get_metric_history(run, key)
    ]
    return pd.DataFrame(found, columns=["run_id", "key", "step", "value", "timestamp"])
