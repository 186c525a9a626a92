"""Bayesian search inside every grid cell: one Optuna study per cell, all cells in one Tune experiment.

Ray's ``OptunaSearch`` keeps one study, and Ray's docs say ``grid_search`` and a search algorithm do not
mix; this searcher keeps a study per grid cell in a persistent Optuna storage (SQLite in the sweep
directory by default, any SQLAlchemy URL such as Postgres) and drives them with Optuna's ask/tell.

Resume consistency (Ray's ``OptunaSearch`` with a database crashed on restore, ``UpdateFinishedTrialError``,
when a trial finished after Tune's last snapshot). The storage is the source of truth for what finished;
Tune's snapshot of its trial table is the source of truth for which Tune trials will run again, and each
Tune trial's config names its study trials (its point's tags). After a driver kill:
- a study trial that finished before the kill is COMPLETE in storage, whatever the snapshot says; a Tune
  trial replayed for it finds its MLflow run FINISHED, trains nothing, and its result is not told twice;
- a study trial asked after the last snapshot is RUNNING in storage but unknown to the restored Tune:
  on restore it is told its MLflow run's objective if that run FINISHED (it ended before the kill, untold),
  else marked FAIL with user attribute ``sweeper.orphaned`` (its MLflow run, if any, KILLED), and then it
  does not count toward the cell's budget, so the cell asks again;
- every other trial counts, so each cell ends with exactly ``trials_per_cell`` counted trials and none
  RUNNING.
The searcher's own snapshot (its map of live Tune trials) is not trusted on restore: Tune writes its trial
table first and the searcher's state second, so a kill between the two left a Tune trial that would run
again and finish while the searcher had orphaned its study trial (the cell then ran one trial too many),
or a finished Tune trial the searcher still waited for (the sweep never ended). The map is rebuilt from
Tune's trial table instead (:func:`tune_trials_to_rerun`).

Trial bundles (``bundle`` in the spec, trainables.bundle): one Tune trial trains several study trials as
one stacked model. The searcher asks them together, from cells whose trials may share a bundle (the same
``group``), and tells each member's own result; each member keeps its own MLflow run and study trial. A
bundle's members are asked before any of them is told, so bundles trade the search's feedback for
throughput: ``auto`` keeps each study hearing back in at least :data:`AUTO_ROUNDS` rounds.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import pickle
import warnings
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.search import Searcher

from sweeper.location import parse_location
from sweeper.points import BundlePoint, TrialPoint, point_from_dict
from sweeper.tracking import (
    TAG_BEST_PREFIX,
    TAG_FAILURE,
    TAG_STUDY,
    TAG_STUDY_TRIAL,
    TAG_SWEEP,
    TAG_TRIAL,
    study_name,
)

ORPHANED = "sweeper.orphaned"
# What optuna-dashboard shows of a study and its trials (user attributes).
STUDY_SWEEP = "sweep"
STUDY_CELL = "cell"
STUDY_PARENT_RUN = "mlflow_parent_run"
STUDY_EXPERIMENT = "mlflow_experiment"
TRIAL_RUN_ID = "mlflow_run_id"
AUTO_ROUNDS = 4
"""``bundle: auto`` with search: bundles a quarter the size of a grid's, so a study is told results in at
least this many rounds instead of asking its whole budget before any result (which is random search)."""


def auto_bundle_size(trials_in_group: int, slots: int) -> int:
    """Members per bundle for ``bundle: auto`` in a searched sweep (see :data:`AUTO_ROUNDS`)."""
    return max(1, math.ceil(trials_in_group / (slots * AUTO_ROUNDS)))


def make_distribution(spec: dict[str, Any]):
    """``{loguniform: [lo, hi]} | {uniform: [lo, hi]} | {int: [lo, hi]} | {choice: [...]}`` -> Optuna's."""
    ((kind, args),) = spec.items()
    if kind == "loguniform":
        return FloatDistribution(args[0], args[1], log=True)
    if kind == "uniform":
        return FloatDistribution(args[0], args[1])
    if kind == "int":
        return IntDistribution(args[0], args[1])
    return CategoricalDistribution(args)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


TUNE_SNAPSHOT = "experiment_state-*.json"
"""Tune's trial table (``TuneController.CKPT_FILE_TMPL``): one file per driver session, named by its start
time, so the greatest name is the newest, which is the one ``Tuner.restore`` loads."""


def tune_trials_to_rerun(experiment: str) -> dict[str, dict[str, Any]] | None:
    """Tune trial id -> its point (as a dict), for every trial of the Tune experiment's newest snapshot
    that a restore runs again (all but TERMINATED: the sweep resumes errored trials too); None when the
    experiment has no snapshot yet."""
    import pyarrow.fs as pafs

    location = parse_location(experiment)
    infos = location.fs.get_file_info(pafs.FileSelector(location.path, allow_not_found=True))
    for name in sorted(fnmatch.filter([info.base_name for info in infos], TUNE_SNAPSHOT), reverse=True):
        try:
            state = json.loads(location.read_text(name))
        except ValueError:
            # This session's first table, half copied into place by Tune's background sync: it holds the
            # trials of the one restored from, which is the next newest.
            continue
        return _rerun(state)
    return None


def _rerun(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json)
        if trial["status"] != "TERMINATED":
            out[trial["trial_id"]] = trial["config"]["point"]
    return out


class CellSearcher(Searcher):
    """Suggests trial configs for every grid cell from that cell's own Optuna study.

    ``cells``: one dict per grid point: ``key``, ``name`` (its varying values), ``cell`` (its tag), ``trial`` (its trial
    config as a dict), ``data_root`` and ``group`` (cells of one group may share a bundle). ``space``:
    dotted trial-config path -> distribution spec. ``bundle``: study trials per Tune trial
    (sweeper.points.BundlePoint); the objective is then told per member, from the bundle's
    ``m<i>:<metric>`` results. ``experiment``: Tune's experiment directory (a path or URI), whose trial
    table tells a restored searcher which Tune trials will run again. ``sweep_name``: shown with each study.
    """

    def __init__(
        self,
        *,
        cells: list[dict[str, Any]],
        space: dict[str, dict[str, Any]],
        sampler: str,
        seed: int,
        trials_per_cell: int,
        max_concurrent: int,
        storage_url: str,
        sweep: dict[str, Any],
        metric: str,
        mode: str,
        bundle: int = 1,
        experiment: str | None = None,
        sweep_name: str | None = None,
    ) -> None:
        # Tune checks that every result holds the searcher's metric; a bundle's results hold it per member
        # (m0:test_acc, ...), so bundled searchers keep the objective to themselves.
        super().__init__(metric=metric if bundle == 1 else None, mode=mode if bundle == 1 else None)
        self.objective, self.direction = metric, mode
        self.bundle = bundle
        self.cells = cells
        self.space = space
        self.sampler = sampler
        self.seed = seed
        self.budget = trials_per_cell
        self.max_concurrent = max_concurrent
        self.storage_url = storage_url
        self.sweep = sweep
        self.experiment = experiment
        self.sweep_name = sweep_name
        # Tune trial id -> its (cell index, study trial number) members: one, or a bundle's.
        self.live: dict[str, list[tuple[int, int]]] = {}
        self._studies: dict[int, optuna.Study] = {}
        self._reconciled = False

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into tuner.pkl: studies hold database connections; they are reopened from storage.
        state = self.__dict__.copy()
        state["_studies"] = {}
        return state

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True  # this searcher limits concurrency itself, and its count survives a restore

    # ---- studies ------------------------------------------------------------------------------------
    def study(self, index: int) -> optuna.Study:
        if index not in self._studies:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._studies[index] = optuna.create_study(
                study_name=self.study_name_of(index),
                storage=optuna.storages.RDBStorage(self.storage_url),
                sampler=make_sampler(self.sampler, self.seed + index),
                direction="maximize" if self.direction == "max" else "minimize",
                load_if_exists=True,
            )
            self._describe(index)
        return self._studies[index]

    def study_name_of(self, index: int) -> str:
        # Cells pickled (in a resumed sweep's tuner.pkl) before studies had readable names keep theirs.
        return self.cells[index].get("study") or study_name(self.sweep["sweep_id"], self.cells[index]["key"])

    def _describe(self, index: int) -> None:
        """What a study browser (optuna-dashboard) shows of a study: its sweep, cell and parent run as
        user attributes, and its objective's name on the axes instead of "Objective 0". Studies made
        before these existed get them when they are next opened."""
        study = self._studies[index]
        cell = self.cells[index]
        attrs = {
            STUDY_SWEEP: getattr(self, "sweep_name", None) or self.sweep.get("sweep_id"),
            STUDY_CELL: cell.get("label") or cell.get("cell", cell["name"]),
            STUDY_PARENT_RUN: self.sweep.get("parent_run_id"),
            STUDY_EXPERIMENT: self.sweep.get("experiment_id"),
        }
        for key, value in attrs.items():
            if value is not None and study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
        if study.metric_names != [self.objective]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([self.objective])

    def counted(self, index: int) -> list[optuna.trial.FrozenTrial]:
        """The cell's trials that count toward its budget (all but orphans of a killed driver)."""
        return [t for t in self.study(index).get_trials(deepcopy=False) if not t.user_attrs.get(ORPHANED)]

    def _reconcile(self) -> None:
        """Take the live Tune trials from Tune's own snapshot, then mark study trials RUNNING in storage
        but in none of them as orphans."""
        experiment = getattr(self, "experiment", None)  # searchers pickled before it was kept
        rerun = tune_trials_to_rerun(experiment) if experiment else None
        if rerun is not None:
            self.live = {trial_id: self._members(point) for trial_id, point in rerun.items()}
        known = {member for members in self.live.values() for member in members}
        for index in range(len(self.cells)):
            study = self.study(index)
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if (index, trial.number) in known:
                    continue
                finished, value = self._settle_run(index, trial.number)
                if finished:
                    # Asked and finished between two snapshots, the driver killed before it was told:
                    # its MLflow run holds the result, told as on_trial_complete would have told it
                    # (FAIL without a finite objective); asking again would train the cell one too many.
                    if value is None:
                        study.tell(trial.number, state=TrialState.FAIL)
                    else:
                        study.tell(trial.number, value)
                    continue
                study._storage.set_trial_user_attr(trial._trial_id, ORPHANED, True)
                study.tell(trial.number, state=TrialState.FAIL)
        self._reconciled = True

    def _members(self, point: dict[str, Any]) -> list[tuple[int, int]]:
        """A Tune trial's (cell index, study trial number) members, from the point this searcher gave it."""
        cells = {self.study_name_of(i): i for i in range(len(self.cells))}
        parsed = point_from_dict(point)
        points = parsed.members if isinstance(parsed, BundlePoint) else (parsed,)
        return [(cells[p.tags[TAG_STUDY]], int(p.tags[TAG_STUDY_TRIAL])) for p in points]

    def _runs_of(self, index: int, number: int) -> list[Any]:
        """The MLflow runs of one study trial (one, unless a killed driver left another)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.sweep["tracking_uri"])
        key = trial_key(self.cells[index]["key"], number)
        return client.search_runs(
            [self.sweep["experiment_id"]],
            filter_string=f"tags.`{TAG_SWEEP}` = '{self.sweep['sweep_id']}' and tags.`{TAG_TRIAL}` = '{key}'",
        )

    def _name_run(self, index: int, number: int) -> None:
        """Give the study trial its MLflow run's id, so a study browser leads to the run. Best effort: a
        tracking store away for a moment must not keep the searcher from telling the study."""
        try:
            runs = self._runs_of(index, number)
        except Exception:  # noqa: BLE001 - any store error; the run id is a convenience
            return
        finished = [r for r in runs if r.info.status == "FINISHED"] or runs
        if finished:
            study = self.study(index)
            trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
            # Optuna's public Trial API sets attributes only from inside an objective; a finished trial
            # cannot be changed at all, so this runs before the study is told.
            study._storage.set_trial_user_attr(trial._trial_id, TRIAL_RUN_ID, finished[0].info.run_id)

    def _settle_run(self, index: int, number: int) -> tuple[bool, float | None]:
        """An unknown study trial's MLflow run: (True, its finite objective or None) if it FINISHED, else
        (False, None), the run KILLED if it was still RUNNING."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.sweep["tracking_uri"])
        runs = self._runs_of(index, number)
        for run in runs:
            if run.info.status == "FINISHED":
                value = run.data.metrics.get(self.objective)
                return True, (float(value) if value is not None and math.isfinite(value) else None)
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_tag(
                    run.info.run_id,
                    TAG_FAILURE,
                    "orphaned: asked after the last snapshot of a killed driver",
                )
                client.set_terminated(run.info.run_id, "KILLED")
        return False, None

    # ---- Tune's Searcher API ------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self._reconciled:
            self._reconcile()
        used = [len(self.counted(i)) for i in range(len(self.cells))]
        open_cells = [i for i in range(len(self.cells)) if used[i] < self.budget]
        if not open_cells:
            return Searcher.FINISHED if not self.live else None
        if len(self.live) >= self.max_concurrent:
            return None
        distributions = {path: make_distribution(spec) for path, spec in self.space.items()}
        members: list[tuple[int, int]] = []
        points = []
        while len(members) < self.bundle:
            # Round-robin over cells, fewest asked first; a bundle fills up from cells of its first's group.
            if members:
                group = self.cells[members[0][0]]["group"]
                open_cells = [i for i in open_cells if self.cells[i]["group"] == group]
            open_cells = [i for i in open_cells if used[i] < self.budget]
            if not open_cells:
                break
            index = min(open_cells, key=lambda i: (used[i], i))
            trial = self.study(index).ask(distributions)
            used[index] += 1
            members.append((index, trial.number))
            points.append(self._point(index, trial.number, trial.params))
        self.live[trial_id] = members
        point = points[0] if len(points) == 1 else BundlePoint.of(points)
        return {"point": point.to_dict(), "sweep": self.sweep}

    def _point(self, index: int, number: int, params: dict[str, Any]) -> TrialPoint:
        import json

        from trainables.config import set_path

        cell = self.cells[index]
        trial = json.loads(json.dumps(cell["trial"]))
        for path, value in params.items():
            set_path(trial, path, value)
        prefix = f"{cell['name']} " if cell["name"] != "trial" else ""
        return TrialPoint(
            trial=trial,
            key=trial_key(cell["key"], number),
            name=f"{prefix}trial={number}",
            cell=cell.get("cell", cell["name"]),  # searchers pickled before cells had a label
            order=f"{index:06d}-{number:06d}",
            data_root=cell["data_root"],
            tags={TAG_STUDY: self.study_name_of(index), TAG_STUDY_TRIAL: str(number)},
        )

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not self._reconciled:
            self._reconcile()  # a restored trial can end before Tune first asks for a new one
        members = self.live.pop(trial_id, [])
        result = result or {}
        for i, (index, number) in enumerate(members):
            study = self.study(index)
            state = next(t.state for t in study.get_trials(deepcopy=False) if t.number == number)
            if state.is_finished():
                continue  # told before the driver was killed; the replayed Tune trial changes nothing
            prefix = BundlePoint.member_prefix(i) if len(members) > 1 else ""
            self._name_run(index, number)
            value = result.get(prefix + self.objective)
            failed = error or f"{prefix}error" in result
            if failed or value is None or not math.isfinite(float(value)):
                study.tell(number, state=TrialState.FAIL)
            else:
                study.tell(number, float(value))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"live": self.live}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.live = pickle.load(f)["live"]
        self._reconciled = False


def trial_key(cell_key: str, number: int) -> str:
    return f"{cell_key}-t{number}"


def best_per_cell(searcher: CellSearcher) -> tuple[dict[str, float], dict[str, str]]:
    """Per cell: the best value as a parent-run metric, and the cell, params and value as a tag."""
    import json

    metrics, tags = {}, {}
    for index, cell in enumerate(searcher.cells):
        key = cell.get("best_key", cell["key"])  # by the study's label; by hash in older sweeps
        done = [t for t in searcher.counted(index) if t.state == TrialState.COMPLETE]
        metrics[f"trials_complete/{key}"] = float(len(done))
        if not done:
            continue
        best = (max if searcher.direction == "max" else min)(done, key=lambda t: t.value)
        metrics[f"best_value/{key}"] = float(best.value)
        tags[f"{TAG_BEST_PREFIX}{key}"] = json.dumps(
            {
                "cell": cell.get("label", cell["name"]),
                "study": searcher.study_name_of(index),
                "study_trial": best.number,
                "value": best.value,
                "params": best.params,
            }
        )
    return metrics, tags


logging.getLogger("optuna").setLevel(logging.WARNING)
