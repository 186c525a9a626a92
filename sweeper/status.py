"""``sweeper status``: where a sweep stands, from its sweep directory and MLflow (works while it runs)."""

from __future__ import annotations

import json
from typing import Any

from mlflow.tracking import MlflowClient

from sweeper.location import Location
from sweeper.spec import expand, load_frozen_spec
from sweeper.tracking import (
    SENTINEL,
    TAG_FAILURE,
    TAG_ORDER,
    TAG_ROLE,
    TAG_SWEEP,
    TAG_TRIAL,
    dashboard_command,
    sweep_view_url,
    ui_command,
)


def sweep_status(sweep_dir: Location) -> dict[str, Any]:
    meta = json.loads(sweep_dir.read_text("sweep.json"))
    loaded = load_frozen_spec(sweep_dir)
    spec = loaded.spec
    client = MlflowClient(meta["tracking_uri"])
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{TAG_SWEEP}` = '{meta['sweep_id']}'",
        max_results=50_000,
    )
    parent = next((r for r in runs if r.data.tags.get(TAG_ROLE) == "parent"), None)
    children = {r.data.tags.get(TAG_TRIAL): r for r in runs if r.data.tags.get(TAG_ROLE) == "trial"}
    metric, mode = spec.objective.metric, spec.objective.mode
    rows = []
    planned = expand(loaded)
    if spec.search is None:
        for trial in planned:
            rows.append(_row(trial.run_name, children.pop(trial.key, None), spec.train.epochs, metric))
    for run in sorted(
        children.values(), key=lambda r: (r.data.tags.get(TAG_ORDER, ""), r.info.run_name or "")
    ):
        rows.append(_row(run.info.run_name, run, spec.train.epochs, metric))
    values = [r[metric] for r in rows if r[metric] is not None]
    best = (max if mode == "max" else min)(values) if values else None
    total = len(planned) * (spec.search.optuna.trials_per_cell if spec.search else 1)
    return {
        "sweep": spec.name,
        "sweep_dir": str(sweep_dir),
        "planned": total,
        "counts": {
            s: sum(r["state"] == s for r in rows)
            for s in ("FINISHED", "RUNNING", "FAILED", "KILLED", "PENDING")
        },
        f"best_{metric}": best,
        "mlflow": ui_command(meta["tracking_uri"]),
        "parent_run_id": parent.info.run_id if parent else None,
        "charts": sweep_view_url(meta["tracking_uri"], parent.info.experiment_id, meta["sweep_id"])
        if parent
        else None,
        "optuna": dashboard_command(meta["optuna_storage"]) if meta.get("optuna_storage") else None,
        "slurm": _slurm(sweep_dir, parent),
        "trials": rows,
    }


def _slurm(sweep_dir: Location, parent) -> dict[str, Any] | None:
    """The sweep's SLURM job (sweeper.slurm), when it was submitted with ``sweeper slurm``: its state
    from SLURM, and each allocation as the job recorded it on the parent run."""
    from sweeper.slurm import TAG_ALLOCATION_PREFIX, job_status

    job = job_status(sweep_dir)
    if job is None:
        return None
    tags = parent.data.tags if parent else {}
    allocations = [
        {"n": int(k[len(TAG_ALLOCATION_PREFIX) :]) + 1, **json.loads(v)}
        for k, v in tags.items()
        if k.startswith(TAG_ALLOCATION_PREFIX)
    ]
    return {**job, "allocations": sorted(allocations, key=lambda a: a["n"])}


def _row(name: str, run, epochs: int, metric: str) -> dict[str, Any]:
    if run is None:
        return {
            "trial": name,
            "state": "PENDING",
            "epoch": 0,
            "epochs": epochs,
            metric: None,
            "failure": None,
        }
    return {
        "trial": name,
        "state": run.info.status,
        "epoch": int(run.data.metrics.get(SENTINEL, 0)),
        "epochs": epochs,
        metric: run.data.metrics.get(metric),
        "failure": (run.data.tags.get(TAG_FAILURE) or "").splitlines()[0]
        if run.data.tags.get(TAG_FAILURE)
        else None,
        "run_id": run.info.run_id,
    }


def format_status(status: dict[str, Any]) -> str:
    metric = next(k for k in status if k.startswith("best_"))[len("best_") :]
    lines = [
        f"sweep {status['sweep']} ({status['sweep_dir']}): {status['planned']} planned; "
        + ", ".join(f"{n} {s.lower()}" for s, n in status["counts"].items() if n)
    ]
    best = status[f"best_{metric}"]
    lines.append(f"best {metric} so far: {best:.4f}" if best is not None else f"best {metric}: none yet")
    width = max([len(r["trial"]) for r in status["trials"]] + [5])
    lines.append(f"{'trial'.ljust(width)}  {'state':8s}  {'epoch':>9s}  {metric:>9s}  failure")
    for r in status["trials"]:
        value = f"{r[metric]:.4f}" if r[metric] is not None else "-"
        lines.append(
            f"{r['trial'].ljust(width)}  {r['state']:8s}  {r['epoch']:>4d}/{r['epochs']:<4d}  {value:>9s}  {r['failure'] or ''}"
        )
    lines.append(f"MLflow: {status['mlflow']} (parent run {status['parent_run_id']})")
    if status["charts"]:
        lines.append(f"charts: {status['charts']}")
    if status.get("optuna"):
        lines.append(f"Optuna studies (one per cell): {status['optuna']}")
    if job := status.get("slurm"):
        where = f" on {job['nodes']}" if job.get("nodes") else ""
        why = f" ({job['reason']})" if job.get("reason") else ""
        requeues = f", requeued {job['requeues']} times" if job.get("requeues") else ""
        lines.append(f"SLURM job {job['job']}: {job['state']}{why}{where}{requeues}")
        for alloc in job.get("allocations", []):
            lines.append(
                f"  allocation {alloc['n']}: {','.join(alloc['nodes'])} {alloc['start']} .. "
                f"{alloc.get('end', 'now')} {alloc.get('ended', '')}".rstrip()
            )
    return "\n".join(lines)
