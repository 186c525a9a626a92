"""Running a sweep: the sweep directory, Ray, the Tune experiment, the MLflow parent run.

A sweep directory (``STORAGE/NAME``, a path or an object-store URI, see ``sweeper.location``) holds the frozen spec (``spec.yaml``), ``sweep.json`` (sweep id,
spec hash, tracking URI) and the Tune experiment (``tune/``: trial table and checkpoints). Running the same
spec again with the same storage resumes it; a different spec under the same name is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sweeper import local_ray
from sweeper.checkpoints import CHECKPOINT_DIR
from sweeper.location import Location, LocationError, credential_env, parse_location
from sweeper.points import BundlePoint, SweepContext, TrialPoint, point_from_dict
from sweeper.spec import ADDED_FIELDS, LoadedSpec, PlannedTrial, SpecError, expand
from trainables.config import TrialConfig, changed_paths, get_path
from trainables.data import data_root

TUNE_DIR = "tune"
LABELS_VERSION = 2
"""sweep.json's ``labels``: 2 = cells tagged and studies named by readable labels; absent = by paths
and hashes (sweeps made before)."""


@dataclass(frozen=True)
class TrialOutcome:
    name: str
    key: str
    status: str  # FINISHED | FAILED
    metrics: dict[str, float]
    error: str | None


@dataclass(frozen=True)
class SweepResult:
    sweep_dir: Location
    sweep_id: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    outcomes: list[TrialOutcome]
    wall_s: float


def prepare_sweep_dir(loaded: LoadedSpec, sweep_dir: Location, tracking_uri: str) -> dict[str, Any]:
    """Create the sweep directory, or check that an existing one holds the same spec; return sweep.json."""
    try:
        if sweep_dir.exists("sweep.json"):
            meta = json.loads(sweep_dir.read_text("sweep.json"))
            if meta["spec_hash"] != loaded.hash:
                old = yaml.safe_load(sweep_dir.read_text("spec.yaml"))
                # A field added since the sweep started, at its default, is not what changed.
                changed = sorted(
                    path
                    for path in changed_paths(old, loaded.resolved)
                    if not (
                        path in ADDED_FIELDS
                        and get_path(old, path) is None
                        and get_path(loaded.resolved, path) == ADDED_FIELDS[path]
                    )
                )
                longer = (
                    " A sweep trains to the length it started with: another train.epochs is a new sweep."
                    if "train.epochs" in changed
                    else ""
                )
                raise SpecError(
                    f"{loaded.path}: sweep '{sweep_dir}' was started with a different spec; changed: "
                    f"{', '.join(changed)}.{longer} Use another --name (or --storage) for a new sweep."
                )
            frozen = yaml.safe_load(sweep_dir.read_text("spec.yaml"))
            if frozen.get("reference", []) != loaded.resolved.get("reference", []):
                # Published numbers added or corrected since: `report` compares with the new ones.
                frozen["reference"] = loaded.resolved["reference"]
                sweep_dir.write_text("spec.yaml", yaml.safe_dump(frozen, sort_keys=False))
            return meta
        meta = {
            # Resolved once: a resumed sweep keeps its study storage even if the environment changed.
            "optuna_storage": optuna_storage_url(loaded, sweep_dir) if loaded.spec.search else None,
            "sweep_id": uuid.uuid4().hex,
            "spec_hash": loaded.hash,
            "tracking_uri": tracking_uri,
            "name": loaded.spec.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # Cells are tagged and studies named by their readable labels (PlannedTrial.cell_label);
            # sweeps made before keep the names they started with, so resumed trials still group.
            "labels": LABELS_VERSION,
        }
        sweep_dir.write_text("spec.yaml", yaml.safe_dump(loaded.resolved, sort_keys=False))
        # sweep.json last: its presence means the directory is complete.
        sweep_dir.write_text("sweep.json", json.dumps(meta, indent=2))
    except OSError as err:
        raise LocationError(f"cannot use sweep directory '{sweep_dir}': {err}") from None
    return meta


def kept_tracking_uri(sweep_dir: Location) -> str | None:
    """The store an existing sweep logs to (its sweep.json's, whatever the environment says now)."""
    try:
        return (
            json.loads(sweep_dir.read_text("sweep.json"))["tracking_uri"]
            if sweep_dir.exists("sweep.json")
            else None
        )
    except OSError:
        return None  # an unreadable sweep directory is refused, naming it, when the sweep opens it


def trial_dirname(trial) -> str:
    """Short, stable trial directory names (Tune's default embeds the whole config)."""
    return f"trial_{trial.config['point']['key']}"


def _init_ray(address: str | None, env_vars: dict[str, str], verbose: bool) -> None:
    import ray

    # Trial stdout/stderr (Ray's per-checkpoint INFO lines) stay in Ray's log files unless verbose;
    # failures reach the user through the results table and the MLflow run's failure tag.
    common = dict(runtime_env={"env_vars": env_vars}, logging_level=logging.WARNING, log_to_driver=verbose)
    if address:
        ray.init(address=address, **common)
    else:
        # Ray 2.60 enables token authentication for a new local instance and says so in a WARNING on every
        # run; the token is made and kept for the user, who has nothing to do (a cluster's mode is not
        # touched: it is only logged here, for a local instance). Setting RAY_AUTH_MODE=token instead
        # stopped the local instance from starting.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # "local": a new instance on this machine even when `ray start` left a cluster (or its stale
        # address file) behind; plain ray.init() would try to join that one.
        ray.init(address="local", include_dashboard=False, **common)


def check_resources(loaded: LoadedSpec, trials: list[PlannedTrial], address: str | None) -> None:
    """Before anything starts: refuse a GPU request on a machine without one (local runs), and a GPU
    fraction too small for the memory a trial needs (trainables.memory) on this machine's GPU."""
    spec = loaded.spec
    gpu = spec.resources.gpu
    if gpu == 0 or gpu == "auto":  # auto: chosen to fit, or CPUs without a GPU (sweeper.calibration)
        return
    import torch

    if not torch.cuda.is_available():
        if address:
            return  # the driver of a cluster sweep need not have a GPU; Ray places the trials
        raise SpecError(
            f"{loaded.path}: resources.gpu: {gpu} requested but this machine has no CUDA GPU; "
            "use resources.gpu: 0 or run on a cluster with --address"
        )
    if gpu >= 1:
        return
    from trainables.memory import estimate_bytes

    total = torch.cuda.get_device_properties(0).total_memory
    slots = trial_slots(loaded, {"GPU": torch.cuda.device_count(), "CPU": os.cpu_count() or 1})
    members = members_per_trial(loaded, trials, slots)
    needs = {t.run_name: estimate_bytes(t.config, members) for t in trials}
    name, worst = max(needs.items(), key=lambda kv: kv[1])
    if worst > gpu * total:
        gib = 2**30
        raise SpecError(
            f"{loaded.path}: resources.gpu: {gpu} packs {int(1 / gpu)} trials per GPU, "
            f"{gpu * total / gib:.1f} GiB each of this {total / gib:.1f} GiB GPU, but trial {name} needs "
            f"about {worst / gib:.1f} GiB; use resources.gpu: {math.ceil(worst / total * 100) / 100} or more"
        )


def stage_datasets(loaded: LoadedSpec, trials: list[PlannedTrial]) -> None:
    """Make sure every torchvision dataset the trials read is under its data root (downloading it once
    here, where allowed, instead of in every trial at once); refuse to start when one is unavailable."""
    from trainables.data import TORCHVISION, DatasetUnavailable, torchvision_split

    needed = {(t.config.dataset, str(data_root(t.config.data)), t.config.data.download) for t in trials}
    for dataset, root, download in sorted(needed):
        if dataset not in TORCHVISION:
            continue
        try:
            for train in (True, False):
                torchvision_split(dataset, Path(root), train, download)
        except DatasetUnavailable as err:
            raise SpecError(f"{loaded.path}: dataset: {err}") from None


@dataclass(frozen=True)
class OpenSweep:
    """A sweep directory that is ready and its MLflow parent run: what every later step works in."""

    storage: Location
    sweep_dir: Location
    meta: dict[str, Any]
    client: Any  # MlflowClient
    experiment_id: str
    parent_run_id: str

    @property
    def tracking_uri(self) -> str:
        return self.meta["tracking_uri"]

    def trial_context(self, loaded: LoadedSpec) -> dict[str, Any]:
        """What every trial needs of the sweep (Tune stores it with the trials' params)."""
        return SweepContext(
            tracking_uri=self.tracking_uri,
            experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id,
            sweep_id=self.meta["sweep_id"],
            spec_hash=loaded.hash,
            # Trials keep their own checkpoints there (sweeper.checkpoints), not in Tune's.
            checkpoints=self.sweep_dir.child(CHECKPOINT_DIR).uri,
            # Ray leaves torch one thread in a worker, whatever the trial's CPUs.
            threads=max(1, int(loaded.spec.resources.cpu)),
        ).to_dict()


def run_sweep(
    loaded: LoadedSpec,
    *,
    storage: Location | str | Path,
    address: str | None,
    tracking_uri: str,
    progress: bool = True,
    verbose: bool = False,
) -> SweepResult:
    """Run (or resume) every trial of the spec as one Ray Tune experiment; return each trial's outcome."""
    trials = expand(loaded)
    if not isinstance(storage, Location):
        storage = parse_location(storage)
    preflight(loaded, trials, address, kept_tracking_uri(storage.child(loaded.spec.name)) or tracking_uri)
    from sweeper import graceful

    started = time.perf_counter()
    sweep = open_sweep(loaded, storage, tracking_uri)
    with ray_session(sweep, address, verbose):
        loaded = calibrate_sweep(loaded, trials, sweep)
        searcher = _searcher(loaded, trials, sweep) if loaded.spec.search else None
        tuner = build_tuner(loaded, trials, sweep, searcher, progress)
        grid = fit_stoppably(tuner, sweep.sweep_dir.child(CHECKPOINT_DIR).uri)
    if graceful.stop_reason() is not None or any(r.config is None for r in grid):
        # Stopped (a signal): Tune saved its state, the MLflow runs stay RUNNING; `resume` continues.
        raise SweepInterrupted(graceful.stop_reason() or "an interrupt", sweep.sweep_dir)
    outcomes = collect_outcomes(grid)
    finish_sweep(loaded, sweep, outcomes, searcher)
    report_to_parent(sweep)
    return SweepResult(
        sweep.sweep_dir,
        sweep.meta["sweep_id"],
        sweep.tracking_uri,
        sweep.experiment_id,
        sweep.parent_run_id,
        outcomes,
        time.perf_counter() - started,
    )


class SweepInterrupted(Exception):
    """The sweep was stopped by a signal before every trial ended; ``resume`` continues it."""

    def __init__(self, reason: str, sweep_dir: Location) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sweep_dir = sweep_dir


def _quiet_tune_stop(record: logging.LogRecord) -> bool:
    # Tune's own words on a stop advise Tuner.restore; `run`/`resume` end with the sweeper's own line.
    quiet = ("Stop signal received", "Experiment has been interrupted", "Trials did not complete")
    return not record.getMessage().startswith(quiet)


def fit_stoppably(tuner, checkpoints: str):
    """``tuner.fit()`` with sweeper.graceful's stop: no marker left from a run before, and SIGTERM
    handled until Tune's own handlers and the GracefulStop callback's are in place (a restored sweep
    made before the callback existed keeps this fallback: Tune's stop, from the last regular checkpoints)."""
    from sweeper import graceful

    graceful.reset()
    graceful.clear_stop_marker(checkpoints)
    logging.getLogger("ray.tune.tune").addFilter(_quiet_tune_stop)

    def on_term(signum, frame):
        graceful.note_stop("SIGTERM")
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's graceful stop

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        return tuner.fit()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def preflight(loaded: LoadedSpec, trials: list[PlannedTrial], address: str | None, tracking_uri: str) -> None:
    """Refuse, before anything is started or written, what cannot run: resources, datasets, a tracking
    store or a Ray cluster that does not answer."""
    from sweeper.tracking import check_reachable

    check_resources(loaded, trials, address)
    check_address(address)
    check_reachable(tracking_uri)
    stage_datasets(loaded, trials)


class RayUnreachable(ConnectionError):
    """No Ray cluster answers at ``--address`` (Ray itself would retry for minutes)."""


def check_address(address: str | None) -> None:
    """A cluster address must answer a TCP connection within seconds; ``auto`` and ``local`` are Ray's own
    to resolve (``auto`` fails at once without a cluster)."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise RayUnreachable(
            f"--address {address}: expected HOST:PORT (or ray://HOST:PORT), e.g. 10.0.0.5:6379"
        )
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise RayUnreachable(
            f"no Ray cluster answers at {address} ({err.strerror or err}); start its head there "
            "(`ray start --head`), or leave --address and $RAY_ADDRESS out to run on this machine"
        ) from None


def open_sweep(loaded: LoadedSpec, storage: Location | str | Path, tracking_uri: str) -> OpenSweep:
    """The sweep directory (new, or checked to hold this spec) and its parent run (found or created)."""
    from mlflow.tracking import MlflowClient

    from sweeper.tracking import ensure_experiment, ensure_parent_run, ensure_sweep_view, sweep_view_path

    spec = loaded.spec
    if not isinstance(storage, Location):
        storage = parse_location(storage)
    sweep_dir = storage.child(spec.name)
    if spec.search and not sweep_dir.is_local and not _explicit_optuna_storage(loaded):
        raise SpecError(
            f"{loaded.path}: search.optuna.storage: the sweep directory {sweep_dir} is in an object store, "
            "where Optuna's SQLite file cannot live; give a database URL (postgresql://...) there or in "
            "$SWEEPER_OPTUNA_STORAGE"
        )
    meta = prepare_sweep_dir(loaded, sweep_dir, tracking_uri)
    # Before anything of this run starts: end a killed predecessor's leftovers, or refuse while it runs.
    local_ray.end_predecessor(sweep_dir)
    client = MlflowClient(meta["tracking_uri"])
    experiment_id = ensure_experiment(client, spec.experiment, str(sweep_dir))
    ensure_sweep_view(client, experiment_id, meta["sweep_id"], spec.name)
    parent_run_id = ensure_parent_run(
        client,
        experiment_id=experiment_id,
        sweep_id=meta["sweep_id"],
        sweep_name=spec.name,
        spec_hash=loaded.hash,
        spec_text=sweep_dir.read_text("spec.yaml"),
        sweep_dir=str(sweep_dir),
        description=describe(
            loaded, sweep_view_path(experiment_id, meta["sweep_id"]), meta.get("optuna_storage")
        ),
    )
    return OpenSweep(storage, sweep_dir, meta, client, experiment_id, parent_run_id)


def describe(loaded: LoadedSpec, view_path: str = "", optuna_storage: str | None = None) -> str:
    """The parent run's Description: what the sweep trains, its grid, what it reproduces, a link (a UI
    route, so that it works on whatever host serves the UI) to the sweep's saved chart view, and where a
    searched sweep's Optuna studies are."""
    from sweeper.tracking import dashboard_command, sweep_view_name

    spec = loaded.spec
    trials = total_trials(loaded, expand(loaded))
    grid = ", ".join(f"`{k}` ({len(v)})" for k, v in spec.grid.items()) or "none"
    lines = [
        f"Sweep **{spec.name}**: {trials} trials of `{spec.architecture}` on `{spec.dataset}`, "
        f"{spec.train.epochs} epochs each; objective {spec.objective.mode} `{spec.objective.metric}`.",
        f"Grid: {grid}."
        + (
            f" Searched in every cell: {', '.join(f'`{p}`' for p in spec.search.space)}."
            if spec.search
            else ""
        ),
    ]
    if spec.reference:
        lines.append("Reproduces: " + "; ".join(sorted({r.source for r in spec.reference})) + ".")
    if view_path:
        lines.append(
            f"[Charts of this sweep's trials, one line per variant](#{view_path}) "
            f"(in the Views menu: *{sweep_view_name(spec.name)}*)."
        )
    if optuna_storage:
        lines.append(
            "One Optuna study per cell, named `<sweep id>/<cell key>` with the sweep and cell as its user "
            f"attributes: `{dashboard_command(optuna_storage)}`."
        )
    return "\n\n".join(lines)


@contextlib.contextmanager
def ray_session(sweep: OpenSweep, address: str | None, verbose: bool):
    """Join ``address`` or start a local Ray (unless this process already has one), and record a local
    one's processes so that the next run can end them if this driver is killed (sweeper.local_ray)."""
    import ray

    # Tune's per-result JSON/CSV/TensorBoard loggers cost ~5x our own reporting (12 vs 2.4 ms per 100-key
    # result on 2 cores); MLflow holds the metrics.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Without Tune's file loggers, ExperimentAnalysis warns it finds no result.json; results come from
    # the in-memory trial table and MLflow instead.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    started_ray = not ray.is_initialized()
    # Only a driver that starts its own local Ray leaves processes behind when it is killed.
    recorder = (
        local_ray.Recorder(sweep.sweep_dir) if started_ray and not address else contextlib.nullcontext()
    )
    with recorder:
        try:
            if started_ray:
                # Workers do not inherit the driver's environment; trials also get the store and the
                # data root in their params, so a reused Ray session works the same.
                _init_ray(address, {"MLFLOW_TRACKING_URI": sweep.tracking_uri, **credential_env()}, verbose)
            yield
        finally:
            if started_ray:
                ray.shutdown()


def calibrate_sweep(loaded: LoadedSpec, trials: list[PlannedTrial], sweep: OpenSweep) -> LoadedSpec:
    """The spec with numbers for its ``auto`` settings (sweeper.calibration), recorded on the parent run."""
    from sweeper.tracking import record_calibration

    loaded, record = calibrate(loaded, trials, sweep.sweep_dir, sweep.storage)
    if record is not None:
        record_calibration(sweep.client, sweep.parent_run_id, record)
    return loaded


def build_tuner(loaded: LoadedSpec, trials: list[PlannedTrial], sweep: OpenSweep, searcher, progress: bool):
    """Tune's experiment in the sweep directory: restored when it exists (Tune then keeps its own trial
    table and params), else new, over the grid's points (or bundles of them) or the searcher's."""
    from ray import tune

    from sweeper.graceful import GracefulStop
    from sweeper.progress import ProgressPrinter
    from sweeper.trial import run_trial

    spec = loaded.spec
    trainable = tune.with_resources(run_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    experiment = sweep.sweep_dir.child(TUNE_DIR)
    # A local path goes to Tune as a plain path, as before object stores were supported; only a remote
    # location hands Tune its pyarrow filesystem.
    fs = None if sweep.sweep_dir.is_local else sweep.sweep_dir.fs
    if tune.Tuner.can_restore(experiment.path, storage_filesystem=fs):
        return tune.Tuner.restore(
            experiment.path, trainable=trainable, resume_errored=True, storage_filesystem=fs
        )
    if searcher is None:
        points = grid_points(trials, readable_labels(sweep.meta))
        if spec.bundle != 1:
            points = bundle_points(points, [t.config for t in trials], spec.bundle, _trial_slots(loaded))
        param_space = {
            "point": tune.grid_search([p.to_dict() for p in points]),
            "sweep": sweep.trial_context(loaded),
        }
        search_config: dict[str, Any] = {"max_concurrent_trials": spec.max_concurrent}
    else:
        # The searcher hands out whole configs and ends the experiment (num_samples=-1).
        param_space = {}
        search_config = {"search_alg": searcher, "num_samples": -1, **_pruning(loaded)}
    total = total_trials(loaded, trials)
    objective = spec.objective
    callbacks = (
        [ProgressPrinter(total, objective.metric, objective.mode, spec.train.epochs)] if progress else []
    ) + [GracefulStop(sweep.sweep_dir.child(CHECKPOINT_DIR).uri)]
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(reuse_actors=True, trial_dirname_creator=trial_dirname, **search_config),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=sweep.sweep_dir.path,
            storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def readable_labels(meta: dict[str, Any]) -> bool:
    return meta.get("labels", 1) >= LABELS_VERSION


def grid_points(trials: list[PlannedTrial], readable: bool = True) -> list[TrialPoint]:
    """One Tune "point" per planned trial."""
    return [
        TrialPoint(
            trial=t.config.model_dump(mode="json"),
            key=t.key,
            name=t.run_name,
            cell=t.cell_label if readable else t.cell,
            order=f"{t.index:06d}",
            data_root=str(data_root(t.config.data)),
        )
        for t in trials
    ]


def _pruning(loaded: LoadedSpec) -> dict[str, Any]:
    """ASHA early stopping of searched trials, when the spec asks for it."""
    spec = loaded.spec
    if spec.search.prune is None:
        return {}
    from ray.tune.schedulers import ASHAScheduler

    return {
        "scheduler": ASHAScheduler(
            time_attr="epoch",
            metric=spec.objective.metric,
            mode=spec.objective.mode,
            max_t=spec.train.epochs,
            grace_period=spec.search.prune.grace_period,
            reduction_factor=spec.search.prune.reduction_factor,
        )
    }


def collect_outcomes(grid) -> list[TrialOutcome]:
    """Every planned trial's outcome from Tune's results, a bundle's members each from their own keys of
    the bundle's result (BundlePoint.member_results); sorted by name."""
    outcomes = []
    for result in grid:
        point = point_from_dict(result.config["point"])
        error = f"{type(result.error).__name__}: {result.error}" if result.error else None
        metrics = dict(result.metrics or {})
        if isinstance(point, TrialPoint):
            status = "FAILED" if error else "FINISHED"
            outcomes.append(TrialOutcome(point.name, point.key, status, metrics, error))
            continue
        for member, own in zip(point.members, point.member_results(metrics)):
            member_error = own.pop("error", None) or error
            if member_error is None and "epoch" not in own:
                member_error = "no result reported"
            status = "FAILED" if member_error else "FINISHED"
            outcomes.append(TrialOutcome(member.name, member.key, status, own, member_error))
    return sorted(outcomes, key=lambda o: o.name)


def finish_sweep(loaded: LoadedSpec, sweep: OpenSweep, outcomes: list[TrialOutcome], searcher) -> None:
    """The parent run's summary metrics and tags (and each cell's best, with a search); then FINISHED."""
    from sweeper.tracking import TAG_TRIALS_FAILED, finish_parent_run

    summary = _parent_summary(loaded, outcomes)
    tags = {TAG_TRIALS_FAILED: str(sum(o.status == "FAILED" for o in outcomes))}
    if searcher is not None:
        from sweeper.search import best_per_cell

        best, best_tags = best_per_cell(searcher)
        summary.update(best)
        tags.update(best_tags)
    finish_parent_run(sweep.client, sweep.parent_run_id, summary, tags)


def report_to_parent(sweep: OpenSweep) -> None:
    """``sweeper report``'s table and figures on the parent run, so the MLflow UI has them after ``run``
    or ``resume`` alone (in ``<sweep dir>/report`` too for a local sweep). A failure here costs the
    report, which ``sweeper report`` can redo, never the sweep."""
    import sys
    import tempfile

    from sweeper.report import NothingToReport, make_report

    try:
        if sweep.sweep_dir.is_local:
            make_report(sweep.sweep_dir, "md", None)
        else:  # nowhere local to keep it: MLflow has it
            with tempfile.TemporaryDirectory(prefix="sweeper-report-") as tmp:
                make_report(sweep.sweep_dir, "md", Path(tmp))
    except NothingToReport:
        pass  # every trial failed: the results printed say so
    except Exception as err:
        print(
            f"warning: the report of {sweep.sweep_dir} was not logged to its parent run "
            f"({type(err).__name__}: {err}); `sweeper report` makes it",
            file=sys.stderr,
        )


def calibrate(
    loaded: LoadedSpec, trials: list[PlannedTrial], sweep_dir: Location, storage: Location
) -> tuple[LoadedSpec, dict[str, Any] | None]:
    """The spec with numbers for what it leaves to ``auto``, measured on the cluster (sweeper.calibration)."""
    from collections import Counter

    from sweeper import calibration

    groups = Counter(_group(t.config) for t in trials)
    largest = max(groups, key=groups.get)
    return calibration.resolve(
        loaded,
        trials,
        sweep_dir,
        storage,
        representative=next(t.config for t in trials if _group(t.config) == largest),
        bundle_cap=lambda spec, total: members_per_trial(spec, trials, trial_slots(spec, total)),
    )


def total_trials(loaded: LoadedSpec, trials: list[PlannedTrial]) -> int:
    search = loaded.spec.search
    return len(trials) if search is None else len(trials) * search.optuna.trials_per_cell


def _explicit_optuna_storage(loaded: LoadedSpec) -> bool:
    return bool(loaded.spec.search.optuna.storage or os.environ.get("SWEEPER_OPTUNA_STORAGE"))


def _trial_slots(loaded: LoadedSpec) -> int:
    import ray

    return trial_slots(loaded, ray.cluster_resources())


def trial_slots(loaded: LoadedSpec, total: dict[str, float]) -> int:
    """How many trials a cluster with ``total`` resources runs at once: its CPUs (or GPUs) over one
    trial's share, capped by the spec's concurrency limit."""
    spec = loaded.spec
    slots = (
        total.get("GPU", 0) / spec.resources.gpu
        if spec.resources.gpu
        else total.get("CPU", 1) / spec.resources.cpu
    )
    slots = max(1, int(slots))
    limit = spec.search.optuna.max_concurrent if spec.search else spec.max_concurrent
    return min(slots, limit) if limit else slots


def members_per_trial(loaded: LoadedSpec, trials: list[PlannedTrial], slots: int) -> int:
    """The most trials one Tune trial trains together (its bundle size), for the memory check before a
    packed sweep: as :func:`bundle_points` (grid) or the searcher (``search``) will size bundles."""
    spec = loaded.spec
    if spec.bundle == 1:
        return 1
    from collections import Counter

    largest = max(Counter(_group(t.config) for t in trials).values())
    if spec.search:
        from sweeper.search import auto_bundle_size

        asks = largest * spec.search.optuna.trials_per_cell
        return min(asks, spec.bundle if spec.bundle != "auto" else auto_bundle_size(asks, slots))
    return min(largest, spec.bundle if spec.bundle != "auto" else math.ceil(largest / slots))


def _group(cfg: TrialConfig) -> str:
    """Trials of one group may share a bundle."""
    from trainables.bundle import bundle_key

    return f"{bundle_key(cfg)}|{data_root(cfg.data)}"


def bundle_points(
    points: list[TrialPoint], configs: list[TrialConfig], size: int | str, slots: int
) -> list[TrialPoint | BundlePoint]:
    """Group grid points into trial bundles (trainables.bundle): points with the same bundle key, in grid
    order, ``size`` at a time; ``auto`` splits each group evenly over ``slots`` concurrent trials."""
    groups: dict[str, list[TrialPoint]] = {}
    for point, cfg in zip(points, configs):
        groups.setdefault(_group(cfg), []).append(point)
    out: list[TrialPoint | BundlePoint] = []
    for members in groups.values():
        n = size if size != "auto" else math.ceil(len(members) / slots)
        for lo in range(0, len(members), n):
            chunk = members[lo : lo + n]
            out.append(chunk[0] if len(chunk) == 1 else BundlePoint.of(chunk))
    return sorted(out, key=lambda p: p.order)


def optuna_storage_url(loaded: LoadedSpec, sweep_dir: Location) -> str:
    """``search.optuna.storage``, else ``$SWEEPER_OPTUNA_STORAGE`` (the compose stack's Postgres), else
    SQLite in the sweep directory."""
    return (
        loaded.spec.search.optuna.storage
        or os.environ.get("SWEEPER_OPTUNA_STORAGE")
        or f"sqlite:///{Path(sweep_dir.path) / 'optuna.db'}"
    )


def _searcher(loaded: LoadedSpec, trials: list[PlannedTrial], sweep: OpenSweep):
    from sweeper.search import CellSearcher
    from sweeper.tracking import key_label, readable_study_name, study_name

    search = loaded.spec.search
    readable, sweep_id = readable_labels(sweep.meta), sweep.meta["sweep_id"]
    cells = [
        {
            "key": t.key,
            "name": t.run_name,
            "cell": t.cell_label if readable else t.label,
            "label": t.study_label if readable else t.run_name,
            "study": (
                readable_study_name(loaded.spec.name, sweep_id, t.study_label)
                if readable
                else study_name(sweep_id, t.key)
            ),
            "best_key": key_label(t.study_label) if readable else t.key,
            "trial": t.config.model_dump(mode="json"),
            "data_root": str(data_root(t.config.data)),
            "group": _group(t.config),
        }
        for t in trials
    ]
    return CellSearcher(
        cells=cells,
        space={path: dist.as_spec() for path, dist in search.space.items()},
        sampler=search.optuna.sampler,
        seed=search.optuna.seed,
        trials_per_cell=search.optuna.trials_per_cell,
        max_concurrent=search.optuna.max_concurrent,
        storage_url=sweep.meta["optuna_storage"],
        sweep=sweep.trial_context(loaded),
        metric=loaded.spec.objective.metric,
        mode=loaded.spec.objective.mode,
        bundle=members_per_trial(loaded, trials, _trial_slots(loaded)),
        experiment=sweep.sweep_dir.child(TUNE_DIR).uri,
        sweep_name=loaded.spec.name,
    )


def _parent_summary(loaded: LoadedSpec, outcomes: list[TrialOutcome]) -> dict[str, float]:
    metric, mode = loaded.spec.objective.metric, loaded.spec.objective.mode
    values = [o.metrics[metric] for o in outcomes if o.status == "FINISHED" and metric in o.metrics]
    summary = {
        "trials_finished": float(sum(o.status == "FINISHED" for o in outcomes)),
        "trials_failed": float(sum(o.status == "FAILED" for o in outcomes)),
    }
    if values:
        summary[f"best_{metric}"] = max(values) if mode == "max" else min(values)
    return summary
