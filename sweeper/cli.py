"""``python -m sweeper`` / ``sweeper``: parse arguments, call a library function, format its errors.

Bad input ends with one message per problem naming the file and field, exit status 2, no traceback, and
nothing started or written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sweeper.location import LocationError
from sweeper.spec import SpecError, _short, load_frozen_spec, load_spec

EXIT_BAD_INPUT = 2


def _unreachable() -> tuple[type[Exception], ...]:
    from sweeper.orchestrate import RayUnreachable
    from sweeper.tracking import TrackingUnreachable

    return RayUnreachable, TrackingUnreachable


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", type=Path, help="sweep spec (YAML)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field by dotted path, value in YAML (repeatable), e.g. train.epochs=2",
    )
    p.add_argument("--name", help="sweep name (default: the spec's name)")
    p.add_argument(
        "--smoke", action="store_true", help="apply the spec's smoke: overrides (offline, seconds)"
    )


ENVIRONMENT = """environment:
  MLFLOW_TRACKING_URI       MLflow store of a new sweep (default: sqlite:///mlflow.db here); a sweep
                            keeps the store it started with
  RAY_ADDRESS               Ray cluster to join when --address is not given (default: a local Ray)
  SWEEPER_DATA              data root of torchvision datasets when data.root is not set (default: ./data)
  SWEEPER_OPTUNA_STORAGE    Optuna storage of a new searched sweep (default: SQLite in its sweep directory)
  SWEEPER_MAX_TRIALS        refuse grids of more trials than this (default: 20000)
  SWEEPER_PROGRESS_SECONDS  seconds between progress lines when not on a terminal (default: 30)
  SWEEPER_TRACKING_RETRY_S  how long trials wait for a tracking server that went away (default: 900)
  SWEEPER_STOP_GRACE_S      on Ctrl-C or SIGTERM, how long to wait for running trials to checkpoint
                            (default: 120); run and resume then exit 75
"""


def _add_storage(p: argparse.ArgumentParser, reads: bool = True) -> None:
    p.add_argument(
        "--storage",
        default="sweeps",
        help="directory or object-store URI (s3://bucket/prefix) holding sweep directories"
        + (", where a sweep name is looked up" if reads else "")
        + " (default: ./sweeps)",
    )


def _add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join, HOST:PORT (default: $RAY_ADDRESS, else a local Ray instance)",
    )
    p.add_argument("--verbose", action="store_true", help="show the trials' own output and Ray's logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweeper",
        description="Neural-collapse experiment sweeps on Ray Tune.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="run (or resume) every trial of a spec")
    _add_spec_args(run)
    _add_storage(run, reads=False)
    _add_cluster(run)
    slurm = verbs.add_parser(
        "slurm",
        help="submit a sweep as a SLURM job: a Ray cluster per allocation, stopped and requeued before its "
        "time limit, resumed by the next allocation",
    )
    _add_spec_args(slurm)
    slurm.add_argument(
        "--storage",
        default="sweeps",
        help="absolute path on a filesystem every node shares, or an s3:// URI (required in effect: "
        "the default ./sweeps is refused)",
    )
    slurm.add_argument("--nodes", type=int, default=1, help="nodes of the allocation (default: 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default: 0)")
    slurm.add_argument("--cpus-per-node", type=int, help="CPUs per node (default: the partition's)")
    slurm.add_argument("--time", help="wall-time limit, HH:MM:SS or D-HH:MM:SS (default: the partition's)")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--account", help="SLURM account")
    slurm.add_argument(
        "--sbatch",
        action="append",
        default=[],
        help='more sbatch options, e.g. --sbatch "--qos=long --mail-type=END" (repeatable)',
    )
    slurm.add_argument(
        "--signal-lead",
        type=int,
        default=300,
        help="seconds before the time limit at which the sweep stops and requeues (default: 300)",
    )
    slurm.add_argument(
        "--max-requeues", type=int, default=10, help="allocations after the first, at most (default: 10)"
    )
    slurm.add_argument(
        "--no-kill", action="store_true", help="keep the job running when a node fails (trials move on)"
    )
    slurm.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    validate = verbs.add_parser("validate", help="check a spec and every trial it expands to")
    _add_spec_args(validate)
    plan = verbs.add_parser("plan", help="list the trials a spec expands to, with parameter counts")
    _add_spec_args(plan)
    plan.add_argument("--json", action="store_true", help="one JSON object per line")
    resume = verbs.add_parser("resume", help="continue an interrupted sweep from its sweep directory")
    resume.add_argument("sweep", help="sweep directory, or sweep name under --storage")
    _add_storage(resume)
    _add_cluster(resume)
    status = verbs.add_parser("status", help="per-trial state, progress, best objective, failures")
    status.add_argument("sweep", help="sweep directory, or sweep name under --storage")
    _add_storage(status)
    status.add_argument("--json", action="store_true", help="the status as one JSON object")
    report = verbs.add_parser("report", help="results table and figures of a sweep, from MLflow")
    report.add_argument(
        "sweep",
        nargs="+",
        help="sweep directory, or sweep name under --storage; several sweeps of one spec that differ only "
        "in grid.seed pool into one report",
    )
    _add_storage(report)
    report.add_argument(
        "--format",
        choices=["md", "csv", "json"],
        default="md",
        help="format of the table files (default: md)",
    )
    report.add_argument(
        "--out",
        type=Path,
        help="folder to write into (default: <sweep dir>/report; for several sweeps ./report/A+B)",
    )
    export = verbs.add_parser(
        "export", help="every trial's per-epoch metrics (or the trials table) as one Parquet or CSV file"
    )
    export.add_argument("sweep", nargs="+", help="sweep directories, or sweep names under --storage")
    _add_storage(export)
    export.add_argument(
        "--out", type=Path, required=True, help="file to write: .parquet or .csv (by its suffix)"
    )
    export.add_argument(
        "--trials", action="store_true", help="the trials table (one row per trial) instead of the histories"
    )
    export.add_argument("--metric", action="append", help="only this metric (nc1, acc, ...; repeatable)")
    export.add_argument("--split", action="append", choices=["train", "test"], help="only this split")
    export.add_argument("--layer", action="append", help="only this tap (fc1, layer3, ...; repeatable)")
    data = verbs.add_parser("data", help="stage torchvision datasets for machines without internet")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    prepare = data_verbs.add_parser(
        "prepare", help="put a dataset's train and test splits into a data root: a local copy, or a download"
    )
    prepare.add_argument("dataset", help="mnist, fashion_mnist, cifar10, cifar100, svhn or stl10")
    prepare.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="a local copy to import and verify (e.g. /usr/share/datasets/fashion-mnist from Debian's "
        "dataset-fashion-mnist): the IDX files, compressed or not",
    )
    prepare.add_argument(
        "--root", type=Path, default=None, help="data root (default: $SWEEPER_DATA, else ./data)"
    )
    return parser


def submit_slurm(loaded, args: argparse.Namespace) -> int:
    import shlex

    from sweeper.slurm import SlurmError, SlurmOptions, submit

    opts = SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_node=args.cpus_per_node,
        time=args.time,
        partition=args.partition,
        account=args.account,
        sbatch=[a for chunk in args.sbatch for a in shlex.split(chunk)],
        signal_lead=args.signal_lead,
        max_requeues=args.max_requeues,
        no_kill=args.no_kill,
    )
    try:
        job, script, warnings = submit(loaded, args.storage, opts, args.dry_run)
    except SlurmError as err:
        print(f"error: slurm: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if job is None:
        print(script, end="")
        return 0
    name = loaded.spec.name
    print(f"submitted SLURM job {job} for sweep {name}")
    print(f"  follow: squeue -j {job}; sweeper status {name} --storage {args.storage}")
    print(f"  cancel: scancel {job} (the sweep stops resumably; `sweeper slurm` again continues it)")
    return 0


def _interrupted() -> type[Exception]:
    from sweeper.orchestrate import SweepInterrupted

    return SweepInterrupted


def _print_interrupted(stopped, sweep: str) -> int:
    """One line for a stopped sweep (no Tune advice, no traceback); the exit status the SLURM script
    requeues on."""
    from sweeper.graceful import EXIT_INTERRUPTED

    print(
        f"stopped ({stopped.reason}): finished trials are kept, the others continue from their "
        f"checkpoints with: sweeper resume {sweep}",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def show_status(args: argparse.Namespace) -> int:
    from sweeper.report import resolve_sweep_dir
    from sweeper.status import format_status, sweep_status

    try:
        status = sweep_status(resolve_sweep_dir(args.sweep, args.storage))
    except (FileNotFoundError, SpecError, LocationError) as err:
        print(f"error: status: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def resume(args: argparse.Namespace) -> int:
    """Run the sweep's frozen spec again: Tune restores its experiment, MLflow runs are reattached."""
    from sweeper.orchestrate import run_sweep
    from sweeper.report import resolve_sweep_dir

    try:
        sweep_dir = resolve_sweep_dir(args.sweep, args.storage)
        meta = json.loads(sweep_dir.read_text("sweep.json"))
        loaded = load_frozen_spec(sweep_dir)
        result = run_sweep(
            loaded,
            storage=sweep_dir.parent,
            address=args.address,
            tracking_uri=meta["tracking_uri"],
            verbose=args.verbose,
        )
    except (FileNotFoundError, SpecError, LocationError, *_unreachable()) as err:
        print(f"error: resume: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _interrupted() as stopped:
        shown = args.sweep if args.storage == "sweeps" else f"{args.sweep} --storage {args.storage}"
        return _print_interrupted(stopped, shown)
    _print_results(result)
    return 0 if all(o.status == "FINISHED" for o in result.outcomes) else 1


def report(args: argparse.Namespace) -> int:
    from sweeper.report import (
        NothingToReport,
        SweepsDiffer,
        make_report,
        render_comparisons,
        render_table,
        resolve_sweep_dir,
    )

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        print(
            f"error: report: --out {args.out} is a file; give a folder to write the report into",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        found = [resolve_sweep_dir(s, args.storage) for s in args.sweep]
        sweep_dirs = list({str(d): d for d in found}.values())  # one sweep named twice is one sweep
        written = make_report(sweep_dirs, args.format, args.out)
    except NothingToReport as err:
        print(f"report: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, LocationError, SpecError, SweepsDiffer) as err:
        print(f"error: report: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # --out under a file, or not writable
        print(f"error: report: cannot write the report: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(render_table(written.rows, "md"))
    if written.comparisons:
        print(render_comparisons(written.comparisons, "md"))
    if written.left_out:
        print(written.left_out + "\n")
    tables = [p.name for p in written.files if p.suffix != ".png"]
    figures = len(written.files) - len(tables)
    logged = (
        "logged them to the sweep's parent run under report/"
        if written.logged
        else "a report pooling several sweeps is logged to none of them"
    )
    print(f"wrote {', '.join(tables)} and {figures} figures to {written.out}; {logged}")
    return 0


EXPORT_SUFFIXES = (".parquet", ".csv")


def export(args: argparse.Namespace) -> int:
    from sweeper.report import resolve_sweep_dir
    from sweeper.results import load_histories, load_trials

    out: Path = args.out
    if out.suffix not in EXPORT_SUFFIXES:
        print(
            f"error: export: --out {out}: give a file ending in .parquet or .csv (the suffix picks the format)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if out.is_dir() or not out.resolve().parent.is_dir():
        where = "is a folder" if out.is_dir() else f"its folder {out.resolve().parent} does not exist"
        print(f"error: export: --out {out}: {where}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        sweeps = [str(resolve_sweep_dir(s, args.storage)) for s in args.sweep]
        if args.trials:
            table = load_trials(sweeps, args.storage)
        else:
            table = load_histories(
                sweeps, args.storage, metrics=args.metric, splits=args.split, layers=args.layer
            )
    except (FileNotFoundError, LocationError, SpecError) as err:
        print(f"error: export: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if table.empty:
        print(f"export: nothing to write: {', '.join(args.sweep)} logged no such rows yet", file=sys.stderr)
        return 1
    # Whole or not at all: a reader never finds half a file under the name asked for.
    partial = out.with_name(f".{out.name}.partial")
    if out.suffix == ".parquet":
        table.to_parquet(partial, index=False)
    else:
        table.to_csv(partial, index=False)
    partial.replace(out)
    what = "trials" if args.trials else "rows"
    print(f"wrote {len(table):,} {what} ({', '.join(map(str, table.columns))}) to {out}")
    return 0


def prepare_data(dataset: str, root: Path | None, source: Path | None = None) -> int:
    from trainables.data import TORCHVISION, DatasetUnavailable, default_data_root, torchvision_split
    from trainables.local_copies import LocalCopyError, import_local_copy

    if dataset not in TORCHVISION:
        print(
            f"error: data prepare: unknown dataset '{dataset}'; allowed: {', '.join(TORCHVISION)}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    root = (root or default_data_root()).expanduser().resolve()
    if source is not None:
        try:
            target = import_local_copy(dataset, source.expanduser().resolve(), root)
        except LocalCopyError as err:
            print(f"error: data prepare: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        for train in (True, False):
            x, _ = torchvision_split(dataset, root, train, download=False)
            print(f"{dataset} {'train' if train else 'test'}: {len(x)} samples in {target}")
        print(f"verified against the published files; trials read it with data.root: {root}")
        return 0
    try:
        for train in (True, False):
            x, _ = torchvision_split(dataset, root, train, download=True)
            print(f"{dataset} {'train' if train else 'test'}: {len(x)} samples under {root}")
    except DatasetUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"copy {root} to the machine that trains and set data.root or $SWEEPER_DATA to it")
    return 0


def _sweep_named(name: str, storage: str) -> str | None:
    """What to say when ``run NAME`` names a sweep rather than a spec file."""
    from sweeper.report import resolve_sweep_dir

    try:
        found = resolve_sweep_dir(name, storage)
    except (FileNotFoundError, LocationError):
        return None
    return f"{found} is a sweep: `sweeper resume {name}` continues it, `sweeper status {name}` shows it"


def _print_results(result) -> None:
    from sweeper.tracking import sweep_view_url, ui_command

    cols = ["test_acc", "train_acc", "test_loss", "effective_depth", "epoch"]
    rows = [[o.name, o.status] + [_fmt(o.metrics.get(c)) for c in cols] for o in result.outcomes]
    header = ["trial", "status"] + cols
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    failed = [o for o in result.outcomes if o.status == "FAILED"]
    for o in failed:
        print(f"failed: {o.name}: {o.error.splitlines()[0] if o.error else ''}")
    print(
        f"\n{len(result.outcomes) - len(failed)} finished, {len(failed)} failed in {result.wall_s:.1f}s; "
        f"sweep directory {result.sweep_dir}"
    )
    print(f"MLflow: {ui_command(result.tracking_uri)}")
    print(f"charts: {sweep_view_url(result.tracking_uri, result.experiment_id, result.sweep_id)}")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) and not value.is_integer() else str(int(value))


EXIT_BROKEN_PIPE = 128 + 13
"""What a shell reports for a command its reader stopped (SIGPIPE), as for ``git log | head -1``."""


def main(argv: list[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, not at exit, where a closed pipe could no longer be handled
        return status
    except BrokenPipeError:
        # The reader (head, less, grep -m1) has what it wanted. Point stdout at /dev/null so that the
        # interpreter's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # The report reads each trial's summary.json: one MLflow download bar per trial would bury the
    # results table and the live progress.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.verb == "data":
        return prepare_data(args.dataset, args.root, args.source)
    if args.verb == "report":
        return report(args)
    if args.verb == "export":
        return export(args)
    if args.verb == "status":
        return show_status(args)
    if args.verb == "resume":
        return resume(args)
    if args.verb == "run" and not args.spec.exists() and (hint := _sweep_named(str(args.spec), args.storage)):
        print(f"error: {args.spec}: no such spec file; {hint}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        loaded = load_spec(args.spec, args.set, args.name, smoke=args.smoke)
        if args.verb == "validate":
            from sweeper.spec import expand

            n = len(expand(loaded))
            if search := loaded.spec.search:
                budget = search.optuna.trials_per_cell
                print(f"{args.spec}: valid; {n} cells x {budget} trials = {n * budget} trials")
            else:
                print(f"{args.spec}: valid; {n} trials")
            return 0
        if args.verb == "slurm":
            return submit_slurm(loaded, args)
        if args.verb == "plan":
            from sweeper.plan import plan_rows

            for row in plan_rows(loaded):
                if args.json:
                    print(json.dumps(row))
                else:
                    print(
                        "  ".join(f"{k}={_short(v)}" for k, v in row.items() if k not in ("key", "run_name"))
                    )
            return 0
        from sweeper.orchestrate import run_sweep
        from sweeper.tracking import default_tracking_uri

        result = run_sweep(
            loaded,
            storage=args.storage,
            address=args.address,
            tracking_uri=default_tracking_uri(),
            verbose=args.verbose,
        )
    except (SpecError, LocationError, *_unreachable()) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _interrupted() as stopped:
        name = loaded.spec.name
        shown = name if args.storage == "sweeps" else f"{name} --storage {args.storage}"
        return _print_interrupted(stopped, shown)
    _print_results(result)
    return 0 if all(o.status == "FINISHED" for o in result.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
