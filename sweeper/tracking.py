"""MLflow layout: one parent run per sweep, one nested child run per trial, found again by tags.

Ray Tune replays work on restore (it resumes each trial as its last snapshot saw it, and trials that
finished after the snapshot run again), so every write here is idempotent: the parent is found by the
sweep id tag before one is created; a trial finds its child by sweep id + trial key before creating one; an epoch is logged only when it is later than the last epoch already logged, as one
synchronous ``log_batch`` whose last metric is the ``epoch`` sentinel. A trial killed halfway through a
batch therefore re-logs that epoch at most partially, never a step that is already complete.

A bundle's members log to a tracking server concurrently (MLflow's asynchronous ``log_batch``), and the
bundle waits for all of them before it reports the epoch to Tune, so the same holds for them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from trainables.config import METRIC_DEFINITIONS_VERSION, flatten_paths

TAG_SWEEP = "sweeper.sweep_id"
TAG_ROLE = "sweeper.role"
TAG_TRIAL = "sweeper.trial_key"
TAG_CELL = "sweeper.cell"
TAG_ORDER = "sweeper.order"  # sortable position in the plan: grid order, then study trial number
TAG_SPEC_HASH = "sweeper.spec_hash"
TAG_SWEEP_DIR = "sweeper.sweep_dir"
TAG_FAILURE = "sweeper.failure"
TAG_METRICS_VERSION = "sweeper.metric_definitions"
TAG_TAPS = "sweeper.taps"  # a trial's tap names, comma-separated, in depth order
TAG_NODE = "sweeper.node"  # the Ray node a trial runs on now (a retried trial may move)
TAG_STUDY = "sweeper.study"  # searched trials: the Optuna study of their cell
TAG_STUDY_TRIAL = "sweeper.study_trial"  # and their trial number in it
TAG_TRIALS_FAILED = "sweeper.trials_failed"  # parent: how many trials ended FAILED
TAG_CALIBRATION = "sweeper.calibration"  # parent: what `auto` settings were chosen, and the timings why
TAG_BEST_PREFIX = "sweeper.best."  # parent of a searched sweep: sweeper.best.<cell key> = the cell's best
SENTINEL = "epoch"  # logged last in every epoch's batch: its history is the set of complete epochs


RETRY_ENV = "SWEEPER_TRACKING_RETRY_S"


def with_retry(call, *args, **kwargs):
    """Call an MLflow client method, retrying for up to ``$SWEEPER_TRACKING_RETRY_S`` seconds (default
    900) while the tracking server is unreachable, so a restarted server loses nothing: the trial waits,
    then logs what it holds. MLflow's own HTTP retries come first; errors the server answered (a bad
    request) are raised at once."""
    from mlflow.exceptions import MlflowException, RestException

    deadline = time.monotonic() + float(os.environ.get(RETRY_ENV, "900"))
    delay = 1.0
    while True:
        try:
            return call(*args, **kwargs)
        except RestException:
            raise
        except (MlflowException, OSError) as err:
            if isinstance(err, MlflowException) and "API request" not in str(err):
                raise
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


class TrackingUnreachable(ConnectionError):
    """The tracking store does not answer when a sweep starts (before anything is written)."""


REACH_TIMEOUT_S = 10.0


def check_reachable(uri: str) -> None:
    """Fail in seconds, naming ``uri``, when the tracking store does not answer at all. :func:`with_retry`'s
    long patience is for a server that goes away mid-sweep; a sweep that starts against a wrong URI should
    not wait for it (or write anything first)."""
    import urllib.error
    import urllib.request

    hint = "start it, or point MLFLOW_TRACKING_URI at a store that runs (unset, a SQLite file here is used)"
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=REACH_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            return  # something answered: MLflow's own errors, if any, say more than we could
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingUnreachable(
                f"MLflow tracking server {uri} does not answer ({reason}); {hint}"
            ) from None
    elif uri.startswith(("postgresql", "mysql", "mssql")):
        import sqlalchemy

        args = {"connect_timeout": int(REACH_TIMEOUT_S)} if uri.startswith(("postgresql", "mysql")) else {}
        try:
            sqlalchemy.create_engine(uri, connect_args=args).connect().close()
        except ImportError as err:
            raise TrackingUnreachable(
                f"MLflow tracking database {_redacted(uri)}: its driver is not installed ({err}); install "
                "it, or name an installed one in the URI (postgresql+psycopg2://...)"
            ) from None
        except Exception as err:  # each driver raises its own; sqlalchemy wraps them in OperationalError
            reason = str(getattr(err, "orig", err)).strip().splitlines()[0]
            raise TrackingUnreachable(
                f"MLflow tracking database {_redacted(uri)} does not answer ({reason}); {hint}"
            ) from None


def _redacted(uri: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", uri)


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else an absolute SQLite store in the working directory.

    Absolute, because Ray workers run in Ray's session directory: a relative ``sqlite:///mlflow.db``
    would silently write a throwaway database there.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow's marker of a training experiment. MLflow 3.17's UI no longer reads it for its GenAI or training mode
(its sidebar toggle decides; see sweep_view_path), but the API and other MLflow versions do."""


def artifact_location(uri: str, sweep_dir: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside its store, never the working directory.

    MLflow's default for a database store is ``./mlruns`` of whatever folder the experiment happened to
    be created from. A SQLite store gets ``<its folder>/mlartifacts/<experiment>``; another database
    (PostgreSQL, MySQL) ``mlartifacts/<experiment>`` beside the sweep directories (the ``--storage``
    folder); a tracking server (http) and a file store keep their own (None).
    """
    if uri.startswith(("http://", "https://", "file:")) or "://" not in uri:
        return None
    folder = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)
    if uri.startswith("sqlite:///"):
        store = Path(uri[len("sqlite:///") :])
        return (store.parent / "mlartifacts" / folder).resolve().as_uri()
    root = sweep_dir.rstrip("/").rsplit("/", 1)[0]
    if "://" in root:
        return f"{root}/mlartifacts/{folder}"
    return (Path(root) / "mlartifacts" / folder).resolve().as_uri()


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def study_name(sweep_id: str, cell_key: str) -> str:
    """A searched cell's Optuna study in sweeps made before readable names (found again by this name)."""
    return f"{sweep_id}/{cell_key}"


def readable_study_name(sweep_name: str, sweep_id: str, label: str) -> str:
    """A searched cell's Optuna study as optuna-dashboard lists it (names only): the sweep, the cell's
    label, and enough of the sweep id that two sweeps of one name sharing a storage never share a study
    (48 random bits). Optuna cannot rename a study, so a sweep keeps the names it started with."""
    return f"{sweep_name} {label} [{sweep_id[:12]}]"


def key_label(label: str) -> str:
    """A cell label as part of an MLflow metric or tag key, which allow letters, digits and ``_-. :/``
    only: ``etf=depth:1,kind:adaptive seed=0`` -> ``etf:depth:1 kind:adaptive seed:0``."""
    out = label.replace("=", ":").replace(",", " ")
    return re.sub(r"[^\w.\- :]", "_", out)


def dashboard_command(storage_url: str) -> str:
    """How to browse a searched sweep's Optuna studies (each study's sweep, cell and MLflow runs are its
    user attributes). A password in the URL is not shown: supply it as you gave it to the sweep."""
    from sqlalchemy.engine import make_url

    try:
        shown = make_url(storage_url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: show it as given
        shown = storage_url
    return f"optuna-dashboard {shown}"


VIEW_PREFIX = "mlflow.sharedViewState."
"""MLflow 3's saved views of an experiment's runs page are experiment tags under this prefix (the UI's
Views menu lists them; ``?viewStateShareKey=<id>`` opens one)."""


def sweep_view_id(sweep_id: str) -> str:
    return f"sweeper-{sweep_id}"


def sweep_view_name(sweep_name: str) -> str:
    return f"{sweep_name}: trials by variant"


def sweep_view_path(experiment_id: str, sweep_id: str) -> str:
    """The UI route (after ``#``) of the sweep's saved view, in chart mode and the UI's training mode:
    MLflow 3.17's UI takes GenAI or training mode from its sidebar toggle (kept in the browser, GenAI in a
    new one) or this URL parameter, not from the experiment's ``mlflow.experimentKind`` tag."""
    return (
        f"/experiments/{experiment_id}/runs?viewStateShareKey={sweep_view_id(sweep_id)}"
        "&compareRunsMode=CHART&workflowType=machine_learning"
    )


def sweep_view_url(uri: str, experiment_id: str, sweep_id: str) -> str:
    """Where a browser opens the sweep's charts: the tracking server itself, or what ``mlflow ui`` serves
    by default (127.0.0.1:5000) for a store it opens."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#{sweep_view_path(experiment_id, sweep_id)}"


def ensure_sweep_view(client: MlflowClient, experiment_id: str, sweep_id: str, sweep_name: str) -> None:
    """Save the view a researcher wants of one sweep in the experiment's Views menu.

    This sweep's trial runs, grouped by ``sweeper.cell``: one mean line per variant with its seeds'
    min-max band. The parent run, which holds no curves, is left out: grouped, it fell in an "Unassigned"
    group that every chart legend listed (full screen too). The filter selects trials only, and the
    order is by run name, because MLflow 3.17's UI adds the parents of matching runs to the results
    whenever they are ordered by start time (its default; ``shouldFetchParents`` in its runs search). A
    view cannot hide a run otherwise (the UI drops hidden runs from a shared view's state). Written once;
    a resume finds it, and rewrites a view saved in an older form.
    """
    key = VIEW_PREFIX + sweep_view_id(sweep_id)
    state = {
        "searchFilter": f"tags.`{TAG_SWEEP}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'trial'",
        "groupBy": {
            "groupByKeys": [{"mode": "tag", "groupByData": TAG_CELL}],
            "aggregateFunction": "average",
        },
        "useGroupedValuesInCharts": True,
        "orderByKey": "tags.`mlflow.runName`",
        "orderByAsc": True,
    }
    saved = client.get_experiment(experiment_id).tags.get(key)
    if saved is not None and json.loads(json.loads(saved)["state"]) == state:
        return
    now = int(time.time() * 1000)
    envelope = {
        "name": sweep_view_name(sweep_name),
        "createdAt": now,
        "updatedAt": now,
        "state": json.dumps(state),
    }
    client.set_experiment_tag(experiment_id, key, json.dumps(envelope))


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def flatten(data: dict[str, Any]) -> dict[str, str]:
    """Nested config -> flat dotted params (``model.mlp.width``), values as MLflow stores them."""
    return {k: str(v) for k, v in flatten_paths(data).items()}


def history_of(client: MlflowClient, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Each key's ``(step, value)`` history in one run (what figures and the report draw from)."""
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in keys}


def used_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A trial config (as a dict) without what its trial does not read: the model sections of other
    architectures, the Gaussian mixture's settings on another dataset, and unset (None) fields, so an
    MLP trial's params hold no ``model.vit.*`` (MLflow's params table is for what varies and matters)."""
    architecture = config.get("architecture", "")
    section = "resnet" if architecture.startswith("resnet") else architecture
    out = {k: v for k, v in config.items() if k not in ("model", "data")}
    if isinstance(config.get("model"), dict):
        out["model"] = {k: v for k, v in config["model"].items() if k == section}
    if isinstance(config.get("data"), dict):
        data = config["data"]
        out["data"] = {
            k: v for k, v in data.items() if k != "gaussian" or config.get("dataset") == "gaussian"
        }
    return _without_none(out)


def _without_none(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    return {k: _without_none(v) for k, v in data.items() if v is not None}


def _runs_tagged(client: MlflowClient, experiment_id: str, max_results: int = 1000, **tags: str):
    """Active runs carrying every one of ``tags``, the earliest first."""
    clause = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs(
        [experiment_id], filter_string=clause, max_results=max_results, order_by=["start_time ASC"]
    )


def _find_run(client: MlflowClient, experiment_id: str, **tags: str):
    runs = _runs_tagged(client, experiment_id, max_results=1, **tags)
    return runs[0] if runs else None


def _find_or_create_run(
    client: MlflowClient, experiment_id: str, key: dict[str, str], tags: dict[str, str], run_name: str
):
    """The run tagged ``key``, created if there is none; one attempt of :func:`with_retry`.

    A create the server committed but whose answer was lost (the server went down mid-request) is sent
    again by the retry, ours or MLflow's own: observed as a fifth child run for four trials after a
    tracking-server restart. So every attempt searches first, and after creating, the earliest run with
    the trial's tags is the trial's and any later copy is deleted.
    """
    run = _find_run(client, experiment_id, **key)
    if run is not None:
        return run
    client.create_run(experiment_id, tags=tags, run_name=run_name)
    runs = _runs_tagged(client, experiment_id, **key)
    for extra in runs[1:]:
        client.delete_run(extra.info.run_id)
    return runs[0]


def ensure_experiment(client: MlflowClient, experiment: str, sweep_dir: str) -> str:
    """Find the experiment by name, or create it with its artifacts beside the store; return its id.
    An untagged experiment is adopted as a training one; a user's own kind is kept."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client.create_experiment(
            experiment,
            artifact_location=artifact_location(client.tracking_uri, sweep_dir, experiment),
            tags=EXPERIMENT_KIND,
        )
    if not any(k in exp.tags for k in EXPERIMENT_KIND):
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def ensure_parent_run(
    client: MlflowClient,
    *,
    experiment_id: str,
    sweep_id: str,
    sweep_name: str,
    spec_hash: str,
    spec_text: str,
    sweep_dir: str,
    description: str = "",
) -> str:
    """Find the sweep's parent run by tag, or create it; return its run id.
    ``description``: Markdown for the run's Description field (MLflow's ``mlflow.note.content``)."""
    run = _find_run(client, experiment_id, **{TAG_SWEEP: sweep_id, TAG_ROLE: "parent"})
    if run is None:
        tags = {
            TAG_SWEEP: sweep_id,
            TAG_ROLE: "parent",
            TAG_SPEC_HASH: spec_hash,
            TAG_SWEEP_DIR: sweep_dir,
            # MLflow's Source column: what ran, and at which commit of this code.
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "python -m sweeper",
        }
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        run = client.create_run(experiment_id, tags=tags, run_name=sweep_name)
        client.log_text(run.info.run_id, spec_text, "spec.yaml")
    elif run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    if description and run.data.tags.get("mlflow.note.content") != description:
        client.set_tag(run.info.run_id, "mlflow.note.content", description)
    return run.info.run_id


def finish_parent_run(
    client: MlflowClient, run_id: str, summary: dict[str, float], tags: dict[str, str]
) -> None:
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run_id, "FINISHED")


SUMMARY_ARTIFACT = "summary.json"
"""Per trial: ``{"columns": ["metric", "best", "final"], "data": [[key, value at the best-test epoch,
value at the last epoch], ...]}`` (MLflow's table layout), read by ``sweeper report``."""


def summary_table(summary: dict[str, float]) -> dict[str, Any]:
    """``Trainer.summary``'s ``best/*`` and ``final/*`` values side by side, one row per metric."""
    keys = sorted({k.split("/", 1)[1] for k in summary if k.startswith(("best/", "final/"))})
    rows = [[k, summary.get(f"best/{k}"), summary.get(f"final/{k}")] for k in keys]
    return {"columns": ["metric", "best", "final"], "data": rows}


def headline(summary: dict[str, float], test_history) -> dict[str, float]:
    """The numbers a trial is compared by (004 §5.3: test accuracy at the interpolation threshold, at the
    end and at the best epoch), with the best and interpolation epochs; a run's other values are its
    curves' last points and the summary table."""
    out = {
        "best_epoch": summary["best_epoch"],
        "interpolation_epoch": summary["interpolation_epoch"],
        "test_acc_at_best_epoch": summary["best/test_acc"],
        "test_acc_at_end": summary["final/test_acc"],
    }
    at = {int(m.step): m.value for m in test_history}
    if summary["interpolation_epoch"] and int(summary["interpolation_epoch"]) in at:
        out["test_acc_at_interpolation"] = at[int(summary["interpolation_epoch"])]
    return out


def record_calibration(client: MlflowClient, run_id: str, record: dict[str, Any]) -> None:
    """The choice for the spec's ``auto`` settings (sweeper.calibration) on the parent run: a one-line tag
    and the whole record with its timings as ``calibration.json`` (idempotent: a resume writes the same)."""
    with_retry(client.set_tag, run_id, TAG_CALIBRATION, record["reason"][:5000])
    with_retry(client.log_dict, run_id, record, "calibration.json")


class TrialTracker:
    """The child run of one trial. Construct inside the trial, with the tracking URI passed explicitly."""

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        sweep_id: str,
        trial_key: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
    ) -> None:
        self.client = MlflowClient(tracking_uri)
        key = {TAG_SWEEP: sweep_id, TAG_TRIAL: trial_key}
        all_tags = {
            "mlflow.parentRunId": parent_run_id,
            TAG_ROLE: "trial",
            TAG_METRICS_VERSION: f"version {METRIC_DEFINITIONS_VERSION}",
            **key,
            **tags,
        }
        run = with_retry(_find_or_create_run, self.client, experiment_id, key, all_tags, run_name)
        self.run_id = run.info.run_id
        if not run.data.params:  # new, or made by an attempt whose answer an outage swallowed
            params_batch = [Param(k, v) for k, v in flatten(used_fields(params)).items()]
            with_retry(self.client.log_batch, self.run_id, params=params_batch)
            # Params show what the trial uses; the whole resolved config stays one click away.
            with_retry(self.client.log_dict, self.run_id, params, "config.json")
        history = with_retry(self.client.get_metric_history, self.run_id, SENTINEL)
        self.last_epoch = int(max((m.step for m in history), default=0))
        if run.info.status != "RUNNING" and run.info.status != "FINISHED":
            with_retry(self.client.update_run, self.run_id, status="RUNNING")
        self.status = with_retry(self.client.get_run, self.run_id).info.status
        self.remote = tracking_uri.startswith(("http://", "https://"))
        self._pending: tuple[list[Metric], Any] | None = None

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"

    def latest_metrics(self) -> dict[str, float]:
        return dict(with_retry(self.client.get_run, self.run_id).data.metrics)

    def log_dataset(self, describe) -> None:
        """The trial's data as an MLflow dataset input, so the runs table's Datasets column and filter
        work; once per run. ``describe()`` gives trainables.data.describe_splits, called only when the run
        has none yet (it hashes the whole data: a resumed trial skips that)."""
        if with_retry(self.client.get_run, self.run_id).inputs.dataset_inputs:
            return
        info = describe()
        profile = {k: info[k] for k in ("train", "test", "classes", "input_shape")}
        dataset = Dataset(
            name=info["name"],
            digest=info["digest"],
            source_type="local" if info["source"].startswith("/") else "code",
            source=json.dumps({"source": info["source"]}),
            profile=json.dumps(profile),
        )
        inputs = [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])]
        with_retry(self.client.log_inputs, self.run_id, datasets=inputs)

    def log_epoch(self, epoch: int, metrics: dict[str, float], wait: bool = True) -> bool:
        """Log one epoch unless it is already logged; return whether it was logged.

        ``wait=False``: send it in the background (MLflow's asynchronous logging) and return; the epoch
        is logged once :meth:`flush` returns. A bundle's members log that way, because a tracking server
        answers one ``log_batch`` of ~100 metrics in tens of milliseconds and handles several at once
        (benchmarks/RESULTS.md)."""
        self.flush()
        if epoch <= self.last_epoch:
            return False
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != SENTINEL]
        batch.append(Metric(SENTINEL, float(epoch), now, epoch))
        if wait:
            with_retry(self.client.log_batch, self.run_id, metrics=batch, synchronous=True)
        else:
            self._pending = (batch, self.client.log_batch(self.run_id, metrics=batch, synchronous=False))
        self.last_epoch = epoch
        return True

    def flush(self) -> None:
        """Wait for the epoch sent with ``wait=False``. MLflow's background attempt does not outlast a
        server outage, so one that failed is sent again with :func:`with_retry`."""
        if self._pending is None:
            return
        batch, operation = self._pending
        self._pending = None
        try:
            operation.wait()
        except Exception:
            with_retry(self.client.log_batch, self.run_id, metrics=batch, synchronous=True)

    def finish(self, summary: dict[str, float]) -> None:
        """End the run FINISHED with its headline numbers as metrics (:func:`headline`) and the whole
        summary (``Trainer.summary``: every metric at the best-test and the last epoch) as the table
        artifact ``summary.json``: MLflow already shows each curve's last value, and a bar chart per
        summary key would bury the curves."""
        self.flush()
        history = with_retry(self.client.get_metric_history, self.run_id, "test_acc")
        now = int(time.time() * 1000)
        with_retry(self.client.log_dict, self.run_id, summary_table(summary), SUMMARY_ARTIFACT)
        with_retry(
            self.client.log_batch,
            self.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in headline(summary, history).items()],
        )
        with_retry(self.client.set_terminated, self.run_id, RunStatus.to_string(RunStatus.FINISHED))
        self.status = "FINISHED"

    def fail(self, reason: str) -> None:
        self.flush()
        with_retry(self.client.set_tag, self.run_id, TAG_FAILURE, reason[:4000])
        with_retry(self.client.set_terminated, self.run_id, RunStatus.to_string(RunStatus.FAILED))
        self.status = "FAILED"
