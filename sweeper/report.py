"""``sweeper report``: the papers' tables and figures for any sweep, read back from MLflow.

One row per variant (grid cell: the varying values without the seed) in the shape of seed 000's
Tables 1-2 and seed 004's Table 1: trainable parameters, best train and test accuracy, test accuracy at
the interpolation threshold, at the end of training and at the best test epoch, effective depth, each as
mean and standard deviation over the variant's finished trials, with their number; for searched cells
the best parameters of the cell's study.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from sweeper import figures
from sweeper.location import Location, LocationError, parse_location
from sweeper.spec import (
    PERCENT_COLUMNS,
    REPORT_COLUMNS,
    LoadedSpec,
    _short,
    expand,
    load_frozen_spec,
    reference_matches,
)
from sweeper.tracking import (
    SUMMARY_ARTIFACT,
    TAG_BEST_PREFIX,
    TAG_CELL,
    TAG_ORDER,
    TAG_ROLE,
    TAG_SWEEP,
    TAG_TAPS,
    history_of,
)

COLUMNS = list(REPORT_COLUMNS.items())
SPREAD_STDS = 2.0
"""A published value is flagged when it lies more than this many sample standard deviations (over our
seeds) from our mean. Were it the true mean of what we measure, it would lie inside with probability 0.93
for 3 seeds (Student's t with 2 degrees of freedom: P(|t| <= 2 sqrt(3))); were it itself one seed's
result, 0.77. So a flag says "look here", not "irreproducible"."""


@dataclass
class TrialRecord:
    run_id: str
    name: str
    cell: str
    taps: list[str]
    history: figures.History
    values: dict[str, float | None]


def resolve_sweep_dir(sweep: str, storage: str | Path) -> Location:
    """A sweep directory (path or URI), or a sweep name under ``storage``."""
    candidates = [parse_location(sweep)]
    if "://" not in sweep:
        candidates.append(parse_location(storage).child(sweep))
    for candidate in candidates:
        try:
            if candidate.exists("sweep.json"):
                return candidate
        except OSError as err:
            raise LocationError(f"cannot read sweep directory '{candidate}': {err}") from None
    known = sweeps_under(parse_location(storage))
    listed = f"sweeps under {storage}: {', '.join(known)}" if known else f"no sweep under {storage} yet"
    raise FileNotFoundError(
        f"no sweep '{sweep}': {' nor '.join(str(c) for c in candidates)} holds a sweep.json; {listed}"
    )


def sweeps_under(storage: Location) -> list[str]:
    """Names of the sweep directories under ``storage`` (each holds a sweep.json)."""
    import pyarrow.fs as pafs

    try:
        infos = storage.fs.get_file_info(pafs.FileSelector(storage.path, allow_not_found=True))
        return sorted(
            i.base_name
            for i in infos
            if i.type == pafs.FileType.Directory and storage.child(i.base_name).exists("sweep.json")
        )
    except OSError:
        return []


def summary_of(client: MlflowClient, run) -> dict[str, dict[str, float]]:
    """A finished trial's summary, ``{"best": {...}, "final": {...}}``: its ``summary.json`` table, or for a
    run finished before that table existed, its ``best/*`` and ``final/*`` metrics."""
    if SUMMARY_ARTIFACT not in {a.path for a in client.list_artifacts(run.info.run_id)}:  # the older layout
        metrics = run.data.metrics
        return {
            part: {k[len(part) + 1 :]: v for k, v in metrics.items() if k.startswith(f"{part}/")}
            for part in ("best", "final")
        }
    with tempfile.TemporaryDirectory(prefix="sweeper-summary-") as tmp:
        rows = json.loads(
            Path(client.download_artifacts(run.info.run_id, SUMMARY_ARTIFACT, tmp)).read_text()
        )["data"]
    return {
        "best": {r[0]: r[1] for r in rows if r[1] is not None},
        "final": {r[0]: r[2] for r in rows if r[2] is not None},
    }


def _trial_values(
    history: figures.History, metrics: dict[str, float], summary: dict[str, dict[str, float]]
) -> dict[str, float | None]:
    test = dict(history.get("test_acc", []))
    train = dict(history.get("train_acc", []))
    it = int(metrics.get("interpolation_epoch", 0) or 0)
    best_epoch = max(test, key=lambda e: (test[e], -e)) if test else None
    return {
        "trainable_params": summary["final"].get("trainable_params"),
        "best_train_acc": max(train.values()) if train else None,
        "best_test_acc": max(test.values()) if test else None,
        "test_acc_at_interpolation": test.get(it) if it else None,
        "test_acc_at_end": test[max(test)] if test else None,
        "test_acc_at_best_epoch": test[best_epoch] if best_epoch is not None else None,
        "effective_depth": summary["final"].get("effective_depth"),
    }


def collect(client: MlflowClient, sweep_id: str) -> tuple[Any, list[TrialRecord]]:
    parents = client.search_runs(
        experiment_ids=[e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{TAG_SWEEP}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'parent'",
    )
    if not parents:
        raise FileNotFoundError(f"MLflow holds no parent run for sweep {sweep_id}")
    parent = parents[0]
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{TAG_SWEEP}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'trial'",
        max_results=50_000,
    )
    records = []
    for run in sorted(children, key=lambda r: (r.data.tags.get(TAG_ORDER, ""), r.info.run_name or "")):
        if run.info.status != "FINISHED":
            continue
        taps = [t for t in run.data.tags.get(TAG_TAPS, "").split(",") if t]
        keys = ["train_acc", "test_acc"] + [
            f"{metric}/{split}/{tap}"
            for metric in ("ncc_acc", "ncc_mismatch", "nc1", "nc1_ratio", "nc2_etf", "nc3_alignment")
            for split in ("train", "test")
            for tap in taps
        ]
        history = history_of(client, run.info.run_id, [k for k in keys if k in run.data.metrics])
        records.append(
            TrialRecord(
                run.info.run_id,
                run.info.run_name,
                run.data.tags.get(TAG_CELL, "all"),
                taps,
                history,
                _trial_values(history, run.data.metrics, summary_of(client, run)),
            )
        )
    return parent, records


def table_rows(parent, records: list[TrialRecord]) -> list[dict[str, Any]]:
    best_by_cell = {}
    for key, value in parent.data.tags.items():
        if key.startswith(TAG_BEST_PREFIX):
            info = json.loads(value)
            best_by_cell[info["cell"]] = info
    rows = []
    for cell in dict.fromkeys(r.cell for r in records):
        members = [r for r in records if r.cell == cell]
        row: dict[str, Any] = {"variant": cell, "n": len(members)}
        for key, _ in COLUMNS:
            values = [r.values[key] for r in members if r.values[key] is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0 if values else None
        if cell in best_by_cell:
            row["best_params"] = best_by_cell[cell]["params"]
            row["best_value"] = best_by_cell[cell]["value"]
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    mean, std = row.get(key), row.get(f"{key}_std")
    if mean is None:
        return "-"
    if key == "trainable_params":
        return f"{mean:,.0f}"
    if key == "effective_depth":
        return f"{mean:.2f} ± {std:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def render_table(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})
        return out.getvalue()
    header = ["variant", "seeds"] + [label for _, label in COLUMNS]
    searched = any("best_params" in row for row in rows)
    if searched:
        header.append("best searched params")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["variant"], str(row["n"])] + [_cell(row, key) for key, _ in COLUMNS]
        if searched:
            cells.append(json.dumps(row.get("best_params", {})))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Accuracies in percent, mean ± std over the variant's finished trials; IT: interpolation "
        "threshold (first epoch with train accuracy >= 99.5%)."
    )
    return "\n".join(lines) + "\n"


def _mean_history(records: list[TrialRecord]) -> figures.History:
    """Per key and epoch, the mean over a variant's trials."""
    sums: dict[str, dict[int, list[float]]] = {}
    for record in records:
        for key, points in record.history.items():
            for step, value in points:
                sums.setdefault(key, {}).setdefault(step, []).append(value)
    return {key: [(s, statistics.fmean(v)) for s, v in sorted(steps.items())] for key, steps in sums.items()}


def write_figures(records: list[TrialRecord], out: Path) -> list[Path]:
    cells = list(dict.fromkeys(r.cell for r in records))
    variants = {cell: _mean_history([r for r in records if r.cell == cell]) for cell in cells}
    # A variant's taps from its trial that logged the most (a trial that failed early may have none).
    layers = {cell: max((r.taps for r in records if r.cell == cell), key=len) for cell in cells}
    paths = []
    for name, fig in (
        ("ncc_acc_by_epoch.png", figures.ncc_over_epochs(variants, layers)),
        ("ncc_mismatch_by_layer.png", figures.mismatch_by_layer(variants, layers)),
        ("collapse_by_layer.png", figures.collapse_by_layer(variants, layers)),
    ):
        figures.save(fig, out / name)
        paths.append(out / name)
    heatmaps = out / "nc1_heatmaps"
    heatmaps.mkdir(exist_ok=True)
    for record in records:
        if not record.taps:  # failed before its first metric pass: nothing to draw
            continue
        path = heatmaps / f"{record.name.replace('/', '_').replace(' ', '')}.png"
        figures.save(figures.nc1_heatmap(record.history, record.taps, record.name), path)
        paths.append(path)
    return paths


def reference_comparisons(
    loaded: LoadedSpec, records: list[TrialRecord]
) -> tuple[list[dict[str, Any]], str | None]:
    """Each published value of the spec's ``reference`` rows beside our mean and sample std over the
    matched variant's finished trials, their difference, and whether the published value lies within
    :data:`SPREAD_STDS` standard deviations of our mean. Accuracies in percent.

    Also one line naming the rows left out because this sweep's grid runs none of their variants (a grid
    narrowed with ``--set``; the spec file's own grid has them all), or None."""
    if not loaded.spec.reference:
        return [], None
    configs = {}
    for trial in expand(loaded):
        configs.setdefault(trial.cell, trial.config)
    out = []
    absent = []
    for i, ref in enumerate(loaded.spec.reference):
        matched = [cell for cell, config in configs.items() if reference_matches(ref, config)]
        if not matched:
            absent.append(i)
        for cell in matched:
            members = [r for r in records if r.cell == cell]
            for key, paper in ref.values.items():
                scale = 100.0 if key in PERCENT_COLUMNS else 1.0
                ours = [scale * r.values[key] for r in members if r.values[key] is not None]
                out.append(_comparison(cell, key, ours, paper, ref.source))
    note = None
    if absent:
        rows = ", ".join(f"reference[{i}] ({_short(loaded.spec.reference[i].match)})" for i in absent)
        note = (
            f"Left out {len(absent)} of {len(loaded.spec.reference)} reference rows, for variants this "
            f"sweep's grid does not run (it was narrowed): {rows}."
        )
    return out, note


def _comparison(cell: str, key: str, ours: list[float], paper: float, source: str) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": cell, "column": key, "n": len(ours), "paper": paper, "source": source}
    if not ours:
        return {**row, "mean": None, "std": None, "difference": None, "check": "no finished trial"}
    mean = statistics.fmean(ours)
    std = statistics.stdev(ours) if len(ours) > 1 else None
    if std is None:
        check = "1 seed: no spread to compare with"
    elif abs(paper - mean) <= SPREAD_STDS * std:
        check = "within"
    else:
        check = f"OUTSIDE mean ± {SPREAD_STDS:g} std"
    return {**row, "mean": mean, "std": std, "difference": paper - mean, "check": check}


def render_comparisons(comparisons: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(comparisons, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(comparisons[0]))
        writer.writeheader()
        writer.writerows(comparisons)
        return out.getvalue()
    header = ["variant", "column", "seeds", "ours", "paper", "paper - ours", "check", "source"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for c in comparisons:
        digits = 0 if c["column"] == "trainable_params" else 2
        ours = "-" if c["mean"] is None else f"{c['mean']:,.{digits}f}"
        if c["std"] is not None:
            ours += f" ± {c['std']:,.{digits}f}"
        diff = "-" if c["difference"] is None else f"{c['difference']:+,.{digits}f}"
        cells = [c["variant"], REPORT_COLUMNS[c["column"]], str(c["n"]), ours, f"{c['paper']:,.{digits}f}"]
        lines.append("| " + " | ".join(cells + [diff, c["check"], c["source"]]) + " |")
    lines.append("")
    lines.append(
        "Published values from the spec's reference section. Ours: mean ± sample std over the variant's "
        f"finished trials (accuracies in percent); check: whether the published value lies within "
        f"{SPREAD_STDS:g} std of our mean (with one seed there is no spread to check against)."
    )
    return "\n".join(lines) + "\n"


class NothingToReport(LookupError):
    """A sweep without a finished trial yet: no table, no figures, nothing written or logged."""


@dataclass
class WrittenReport:
    out: Path
    rows: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]
    left_out: str | None
    """The line naming reference rows left out (see :func:`reference_comparisons`)."""
    files: list[Path]
    """Every file written, and logged to the parent run: nothing else of ``out``."""


def make_report(sweep_dir: Location, fmt: str, out: Path | None) -> WrittenReport:
    """Write the table and figures to ``out`` (default ``<sweep dir>/report``, or ``./report/<name>`` for a
    sweep in an object store) and log those files, and only those, to the parent run under ``report/``."""
    meta = json.loads(sweep_dir.read_text("sweep.json"))
    client = MlflowClient(meta["tracking_uri"])
    parent, records = collect(client, meta["sweep_id"])
    if not records:
        raise NothingToReport(
            f"sweep {meta['name']} has no finished trial yet; `sweeper status {meta['name']}` shows its trials"
        )
    if out is None:
        local = sweep_dir.local_path
        out = local / "report" if local is not None else Path("report") / meta["name"]
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(parent, records)
    loaded = load_frozen_spec(sweep_dir)
    comparisons, left_out = reference_comparisons(loaded, records)
    table = out / f"results.{fmt}"
    files = [table]
    text = render_table(rows, fmt)
    if comparisons:
        if fmt == "md":
            text += "\n" + render_comparisons(comparisons, fmt)
        else:
            files.append(out / f"reference.{fmt}")
            files[-1].write_text(render_comparisons(comparisons, fmt))
    if left_out and fmt == "md":
        text += "\n" + left_out + "\n"
    table.write_text(text)
    files += write_figures(records, out)
    # Only what was written here: ``out`` may be a folder of the user's (``--out .``) with other files.
    for path in files:
        folder = path.parent.relative_to(out)
        client.log_artifact(
            parent.info.run_id, str(path), "report" + ("" if folder == Path() else f"/{folder}")
        )
    return WrittenReport(out, rows, comparisons, left_out, files)
