"""Bayesian search inside every grid cell: one Optuna study per cell, all cells in one Tune experiment.

Ray's ``OptunaSearch`` keeps one study and does not mix with a grid (PITFALLS.md 17); this searcher keeps
a study per grid cell in a persistent Optuna storage (SQLite in the sweep directory by default, any
SQLAlchemy URL such as Postgres) and drives them with Optuna's ask/tell.

Resume consistency (PITFALLS.md 16). The storage is the source of truth for what finished; Tune's
snapshot holds this searcher's map of live Tune trials to study trials. After a driver kill:
- a study trial that finished before the kill is COMPLETE in storage, whatever the snapshot says; a Tune
  trial replayed for it finds its MLflow run FINISHED, trains nothing, and its result is not told twice;
- a study trial asked after the last snapshot is RUNNING in storage but unknown to the restored Tune:
  on restore it is marked FAIL with user attribute ``sweeper.orphaned`` (its MLflow run, if any, KILLED),
  and it does not count toward the cell's budget, so the cell asks again;
- every other trial counts, so each cell ends with exactly ``trials_per_cell`` counted trials and none
  RUNNING.
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.search import Searcher

ORPHANED = "sweeper.orphaned"


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


def study_name(sweep_id: str, cell_key: str) -> str:
    return f"{sweep_id}/{cell_key}"


class CellSearcher(Searcher):
    """Suggests trial configs for every grid cell from that cell's own Optuna study.

    ``cells``: one dict per grid point: ``key``, ``name`` (its varying values), ``trial`` (its trial
    config as a dict) and ``data_root``. ``space``: dotted trial-config path -> distribution spec.
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
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.cells = cells
        self.space = space
        self.sampler = sampler
        self.seed = seed
        self.budget = trials_per_cell
        self.max_concurrent = max_concurrent
        self.storage_url = storage_url
        self.sweep = sweep
        self.live: dict[str, tuple[int, int]] = {}  # Tune trial id -> (cell index, study trial number)
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
                study_name=study_name(self.sweep["sweep_id"], self.cells[index]["key"]),
                storage=optuna.storages.RDBStorage(self.storage_url),
                sampler=make_sampler(self.sampler, self.seed + index),
                direction="maximize" if self.mode == "max" else "minimize",
                load_if_exists=True,
            )
        return self._studies[index]

    def counted(self, index: int) -> list[optuna.trial.FrozenTrial]:
        """The cell's trials that count toward its budget (all but orphans of a killed driver)."""
        return [t for t in self.study(index).get_trials(deepcopy=False) if not t.user_attrs.get(ORPHANED)]

    def _reconcile(self) -> None:
        """Mark study trials RUNNING in storage but unknown to this (restored) searcher as orphans."""
        known = {(cell, number) for cell, number in self.live.values()}
        for index in range(len(self.cells)):
            study = self.study(index)
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if (index, trial.number) in known:
                    continue
                study._storage.set_trial_user_attr(trial._trial_id, ORPHANED, True)
                study.tell(trial.number, state=TrialState.FAIL)
                self._kill_run(index, trial.number)
        self._reconciled = True

    def _kill_run(self, index: int, number: int) -> None:
        from mlflow.tracking import MlflowClient

        from sweeper.tracking import TAG_SWEEP, TAG_TRIAL

        client = MlflowClient(self.sweep["tracking_uri"])
        key = trial_key(self.cells[index]["key"], number)
        runs = client.search_runs(
            [self.sweep["experiment_id"]],
            filter_string=f"tags.`{TAG_SWEEP}` = '{self.sweep['sweep_id']}' and tags.`{TAG_TRIAL}` = '{key}'",
        )
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_tag(
                    run.info.run_id,
                    "sweeper.failure",
                    "orphaned: asked after the last snapshot of a killed driver",
                )
                client.set_terminated(run.info.run_id, "KILLED")

    # ---- Tune's Searcher API ------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if not self._reconciled:
            self._reconcile()
        live_per_cell = [0] * len(self.cells)
        for cell, _ in self.live.values():
            live_per_cell[cell] += 1
        used = [len(self.counted(i)) for i in range(len(self.cells))]
        open_cells = [i for i in range(len(self.cells)) if used[i] < self.budget]
        if not open_cells:
            return Searcher.FINISHED if not self.live else None
        if len(self.live) >= self.max_concurrent:
            return None
        index = min(open_cells, key=lambda i: (used[i], i))  # round-robin over cells, fewest asked first
        study = self.study(index)
        trial = study.ask({path: make_distribution(spec) for path, spec in self.space.items()})
        self.live[trial_id] = (index, trial.number)
        return {"point": self._point(index, trial.number, trial.params), "sweep": self.sweep}

    def _point(self, index: int, number: int, params: dict[str, Any]) -> dict[str, Any]:
        import json

        from trainables.config import set_path

        cell = self.cells[index]
        trial = json.loads(json.dumps(cell["trial"]))
        for path, value in params.items():
            set_path(trial, path, value)
        prefix = f"{cell['name']}," if cell["name"] != "trial" else ""
        return {
            "trial": trial,
            "key": trial_key(cell["key"], number),
            "name": f"{prefix}trial={number}",
            "cell": cell["name"],
            "order": f"{index:06d}-{number:06d}",
            "data_root": cell["data_root"],
            "tags": {
                "sweeper.study": study_name(self.sweep["sweep_id"], cell["key"]),
                "sweeper.study_trial": str(number),
            },
        }

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        index, number = self.live.pop(trial_id, (None, None))
        if index is None:
            return
        study = self.study(index)
        state = next(t.state for t in study.get_trials(deepcopy=False) if t.number == number)
        if state.is_finished():
            return  # told before the driver was killed; the replayed Tune trial changes nothing
        value = (result or {}).get(self.metric)
        if error or value is None or not math.isfinite(float(value)):
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
        done = [t for t in searcher.counted(index) if t.state == TrialState.COMPLETE]
        metrics[f"trials_complete/{cell['key']}"] = float(len(done))
        if not done:
            continue
        best = (max if searcher.mode == "max" else min)(done, key=lambda t: t.value)
        metrics[f"best_value/{cell['key']}"] = float(best.value)
        tags[f"sweeper.best.{cell['key']}"] = json.dumps(
            {"cell": cell["name"], "study_trial": best.number, "value": best.value, "params": best.params}
        )
    return metrics, tags


logging.getLogger("optuna").setLevel(logging.WARNING)
