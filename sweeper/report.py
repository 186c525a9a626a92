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
import re
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
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
    TAG_STUDY,
    TAG_STUDY_TRIAL,
    TAG_SWEEP,
    TAG_TAPS,
    history_of,
    study_name,
)
from trainables.config import TrialConfig, changed_paths

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
    study: str | None = None
    """A searched trial's Optuna study (one per grid cell) and its trial number there."""
    study_trial: int | None = None


def heatmap_file_name(run_name: str) -> str:
    """A trial's run name as a file name: ``dataset=digits etf=depth:0 trial=0`` becomes
    ``dataset=digits_etf=depth-0_trial=0`` (its parts kept apart; no character a file system or a shell
    minds)."""
    return re.sub(r"[^\w=.,+-]+", "_", run_name.replace(":", "-")).strip("_") or "trial"


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
                run.data.tags.get(TAG_STUDY),
                int(run.data.tags[TAG_STUDY_TRIAL]) if TAG_STUDY_TRIAL in run.data.tags else None,
            )
        )
    return parent, records


def table_rows(parents, records: list[TrialRecord]) -> list[dict[str, Any]]:
    """One row per variant over ``records``; ``parents``: the sweeps' parent runs (one, or a list).

    A searched variant's trials are its studies' search, not repetitions: its row is the best trial of
    each study (one study per seed), as the parents' ``sweeper.best.<study label>`` tags name them, with the
    spread over seeds of those best trials; ``searched`` counts every trial the search ran."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for parent in parents if isinstance(parents, list) else [parents]:
        sweep_id = parent.data.tags.get(TAG_SWEEP)
        for key, value in parent.data.tags.items():
            if key.startswith(TAG_BEST_PREFIX):
                info = json.loads(value)
                study = info.get("study") or study_name(sweep_id, key[len(TAG_BEST_PREFIX) :])
                best[(study, int(info["study_trial"]))] = info
    rows = []
    for cell in dict.fromkeys(r.cell for r in records):
        members = [r for r in records if r.cell == cell]
        searched = [r for r in members if r.study is not None]
        if searched:
            members = [r for r in searched if (r.study, r.study_trial) in best]
        row: dict[str, Any] = {"variant": cell, "n": len(members)}
        for key, _ in COLUMNS:
            values = [r.values[key] for r in members if r.values[key] is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0 if values else None
        if searched:
            row["searched"] = len(searched)
            chosen = [best[(r.study, r.study_trial)] for r in members]
            params = [c["params"] for c in chosen]
            row["best_params"] = params[0] if all(p == params[0] for p in params) else params
            row["best_value"] = statistics.fmean(c["value"] for c in chosen) if chosen else None
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
    searched = any("searched" in row for row in rows)
    if searched:
        header += ["trials searched", "best searched params"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["variant"], str(row["n"])] + [_cell(row, key) for key, _ in COLUMNS]
        if searched:
            cells += [str(row.get("searched", "-")), json.dumps(row.get("best_params", {}))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        (
            "Accuracies in percent, mean ± std over the seeds of each seed's best searched trial "
            "(by the objective); IT: interpolation threshold (first epoch with train accuracy >= 99.5%)."
        )
        if searched
        else (
            "Accuracies in percent, mean ± std over the variant's finished trials; IT: interpolation "
            "threshold (first epoch with train accuracy >= 99.5%)."
        )
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
        path = heatmaps / f"{heatmap_file_name(record.name)}.png"
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
    configs: dict[str, tuple[str, TrialConfig]] = {}
    for trial in expand(loaded):
        # Trials are tagged with the cell's label; by its full paths in sweeps made before labels.
        configs.setdefault(trial.cell_label, (trial.cell, trial.config))
    out = []
    absent = []
    for i, ref in enumerate(loaded.spec.reference):
        matched = [cell for cell, (_, config) in configs.items() if reference_matches(ref, config)]
        if not matched:
            absent.append(i)
        for label in matched:
            members = [r for r in records if r.cell in (label, configs[label][0])]
            cell = members[0].cell if members else label
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
    logged: bool = True
    """Whether the files went to the sweep's parent run (a report pooling several sweeps goes to none)."""


class SweepsDiffer(ValueError):
    """Sweeps that are not one spec over other seeds: their trials do not pool into one table."""


POOLED_PATHS = ("name", "grid.seed", "reference", "smoke.reference")
"""Where sweeps pooled into one report may differ: their names, the seeds they ran, and the published rows
they carry (the first sweep's are compared with)."""


def check_poolable(sweep_dirs: list[Location]) -> None:
    """Refuse sweeps whose frozen specs differ anywhere but :data:`POOLED_PATHS`, naming the fields, or
    that ran a trial twice (the same config in two sweeps would count twice)."""
    first = yaml.safe_load(sweep_dirs[0].read_text("spec.yaml"))
    keys = {t.key: t for t in expand(load_frozen_spec(sweep_dirs[0]))}
    for other in sweep_dirs[1:]:
        spec = yaml.safe_load(other.read_text("spec.yaml"))
        changed = sorted(p for p in changed_paths(first, spec) if p not in POOLED_PATHS)
        if changed:
            raise SweepsDiffer(
                f"sweeps {sweep_dirs[0]} and {other} differ in {', '.join(changed)}; one report pools "
                "sweeps of one spec that differ only in grid.seed"
            )
        twice = [keys[t.key].run_name for t in expand(load_frozen_spec(other)) if t.key in keys]
        if twice:
            raise SweepsDiffer(
                f"sweeps {sweep_dirs[0]} and {other} both ran {', '.join(twice)}: pooled, those trials "
                "would count twice"
            )
        keys.update({t.key: t for t in expand(load_frozen_spec(other))})


def make_report(sweep_dirs: Location | list[Location], fmt: str, out: Path | None) -> WrittenReport:
    """Write the table and figures to ``out`` and log those files, and only those, to the parent run
    under ``report/``. One sweep's default ``out`` is ``<sweep dir>/report``, or ``./report/<name>`` for a
    sweep in an object store.

    Several sweeps of one spec over other seeds (:func:`check_poolable`) pool their finished trials into
    one table and one comparison with the first sweep's published rows, as if one sweep had run every
    seed; that report belongs to no single sweep, so it is logged to none and goes to ``out`` (default
    ``./report/<name>+<name>...``)."""
    dirs = sweep_dirs if isinstance(sweep_dirs, list) else [sweep_dirs]
    if len(dirs) > 1:
        check_poolable(dirs)
    metas = [json.loads(d.read_text("sweep.json")) for d in dirs]
    parents, records = [], []
    for meta in metas:
        client = MlflowClient(meta["tracking_uri"])
        parent, found = collect(client, meta["sweep_id"])
        parents.append(parent)
        if len(dirs) > 1:  # run names repeat across sweeps: heatmap files stay apart
            for record in found:
                record.name = f"{meta['name']} {record.name}"
        records += found
    names = "+".join(m["name"] for m in metas)
    if not records:
        raise NothingToReport(
            f"sweep {names} has no finished trial yet; `sweeper status {metas[0]['name']}` shows its trials"
        )
    if out is None:
        local = dirs[0].local_path
        out = local / "report" if local is not None and len(dirs) == 1 else Path("report") / names
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(parents, records)
    loaded = load_frozen_spec(dirs[0])
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
    if len(dirs) == 1:
        # Only what was written here: ``out`` may be a folder of the user's (``--out .``) with other files.
        client = MlflowClient(metas[0]["tracking_uri"])
        for path in files:
            folder = path.parent.relative_to(out)
            client.log_artifact(
                parents[0].info.run_id, str(path), "report" + ("" if folder == Path() else f"/{folder}")
            )
    return WrittenReport(out, rows, comparisons, left_out, files, logged=len(dirs) == 1)
