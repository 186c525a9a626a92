"""The sweep spec: one YAML file, validated once at the edge, expanded into one trial config per grid point.

A spec holds every :class:`~trainables.config.TrialConfig` field as the base values of its trials, plus
what only a sweep has (name, MLflow experiment, objective, grid, resources). A grid key is a dotted path
into the trial config (``seed``, ``dataset``, ``model.mlp.width``, ``train.optimizer.lr``); every
combination of the grid's values is one trial. Errors name the file and the field path and say what is
allowed; nothing else in the program parses YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from trainables.config import TRIAL_FIELDS, Frozen, TrialConfig, get_path, set_path

RUN_LEVEL_METRICS = (
    "test_acc",
    "train_acc",
    "test_loss",
    "train_loss",
    "batch_loss",
    "effective_depth",
)
"""Metrics a spec's objective may name (what every trial reports to Tune every epoch)."""

ADDED_FIELDS: dict[str, Any] = {"metrics.probe": False, "reference": []}
"""Spec and trial-config fields added after sweeps existed (dotted path -> default). A sweep's spec hash
and its trial keys leave such a field out while it holds that default, so a sweep started before the
field existed (its frozen spec lacks it; Tune's state holds its old trial keys) resumes as the same sweep
with the same trials instead of being refused as a changed spec and trained again. Every field added from
now on belongs here with its default; ``tests/test_spec.py`` fails on one that is missing."""

CASES_KEY = "cases"
MAX_TRIALS_ENV = "SWEEPER_MAX_TRIALS"
DEFAULT_MAX_TRIALS = 20_000
"""A grid is refused, before anything is expanded, past this many trials (``SWEEPER_MAX_TRIALS``
overrides it): validating a trial takes about a millisecond, so 20,000 keep ``validate`` under a minute."""
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
MAPS_OF_PATHS = ("grid", "search.space")
"""Spec fields whose keys are dotted trial-config paths: ``--set grid.model.mlp.width=[8]`` sets one key."""


class SpecError(Exception):
    """An invalid spec; ``str(err)`` is the whole message for the user, one problem per line."""


class Objective(Frozen):
    metric: Literal[RUN_LEVEL_METRICS] = "test_acc"  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"


class Resources(Frozen):
    """Per trial. Fractional GPUs pack several trials on one device (Ray schedules, it does not cap memory).

    ``auto`` (sweeper.calibration): chosen by timing the trials' training step on a node that will run
    them; ``gpu: auto`` without a GPU in the cluster runs the trials on CPUs."""

    cpu: float | Literal["auto"] = 1
    gpu: float | Literal["auto"] = 0

    @field_validator("cpu", "gpu", mode="before")
    @classmethod
    def _amount(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "auto":
            return value
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if info.field_name == "cpu" and not (number and 0 < value <= 1024):
            raise ValueError("must be a number of CPUs above 0 and at most 1024, or 'auto'")
        if info.field_name == "gpu" and not (number and 0 <= value <= 64):
            raise ValueError("must be a number of GPUs from 0 to 64 (a fraction packs trials), or 'auto'")
        return value


class Distribution(Frozen):
    """Exactly one of: ``loguniform: [lo, hi]``, ``uniform: [lo, hi]``, ``int: [lo, hi]``, ``choice: [...]``."""

    loguniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    int_: Annotated[list[int], Field(min_length=2, max_length=2)] | None = Field(default=None, alias="int")
    choice: Annotated[list[Any], Field(min_length=1)] | None = None

    model_config = Frozen.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        given = {k: v for k, v in self.as_spec_items() if v is not None}
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, int, choice")
        ((kind, args),) = given.items()
        if kind in ("loguniform", "uniform", "int") and not args[0] < args[1]:
            raise ValueError(f"{kind}: [lo, hi] needs lo < hi, got {args}")
        if kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"loguniform: lo must be > 0, got {args[0]}")
        return self

    def as_spec_items(self) -> list[tuple[str, Any]]:
        return [
            ("loguniform", self.loguniform),
            ("uniform", self.uniform),
            ("int", self.int_),
            ("choice", self.choice),
        ]

    def as_spec(self) -> dict[str, Any]:
        return {k: v for k, v in self.as_spec_items() if v is not None}

    def extremes(self) -> list[Any]:
        ((kind, args),) = self.as_spec().items()
        return list(args) if kind == "choice" else [args[0], args[1]]


class OptunaSettings(Frozen):
    sampler: Literal["gp", "tpe", "random"] = "gp"
    """gp: Optuna's GPSampler, the Bayesian default (004 used BoTorch's GP); tpe; random."""
    trials_per_cell: Annotated[int, Field(ge=1, le=100_000)] = 30
    max_concurrent: Annotated[int, Field(ge=1, le=10_000)] = 4
    seed: int = 0
    storage: str | None = None
    """SQLAlchemy URL of the Optuna storage (e.g. postgresql://...); default SQLite in the sweep directory."""


class PruneSettings(Frozen):
    """ASHA early stopping on the objective, per epoch (off unless given)."""

    grace_period: Annotated[int, Field(ge=1)] = 5
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0


class SearchSpec(Frozen):
    optuna: OptunaSettings = OptunaSettings()
    space: Annotated[dict[str, Distribution], Field(min_length=1)]
    prune: PruneSettings | None = None

    @field_validator("space")
    @classmethod
    def _paths_exist(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        for path in space:
            _check_path(path, "search.space key")
        return space


REPORT_COLUMNS = {
    "trainable_params": "trainable params",
    "best_train_acc": "best train acc",
    "best_test_acc": "best test acc",
    "test_acc_at_interpolation": "test acc at IT",
    "test_acc_at_end": "test acc at end",
    "test_acc_at_best_epoch": "test acc at best epoch",
    "effective_depth": "effective depth",
}
"""The columns of ``sweeper report``'s table (key -> label), which a ``reference`` row may give values for."""
PERCENT_COLUMNS = tuple(k for k in REPORT_COLUMNS if "acc" in k)
"""Accuracies: reported, and written in ``reference`` rows, in percent as the papers print them."""


class ReferenceRow(Frozen):
    """A published result for the variants a sweep's grid runs (``sweeper report`` prints it beside ours).

    ``match`` picks the variants by trial-config values (a dotted path to a value, or to a mapping that
    the variant's section must contain, e.g. ``etf: {depth: 2}``); an empty ``match`` is every variant.
    ``values`` holds report columns (see :data:`REPORT_COLUMNS`), accuracies in percent."""

    source: Annotated[str, Field(min_length=1, max_length=300)]
    """Where the numbers are published: the paper and its table, e.g. "seed 000, Table 1"."""
    match: dict[str, Any] = {}
    values: dict[Literal[tuple(REPORT_COLUMNS)], float]  # type: ignore[valid-type]

    @field_validator("match")
    @classmethod
    def _match_paths_exist(cls, match: dict[str, Any]) -> dict[str, Any]:
        for path, value in match.items():
            try:
                _check_path(path, "reference match key")
            except ValueError as err:
                # A section may be matched by a mapping of its fields.
                if not (isinstance(value, dict) and "is a section" in str(err)):
                    raise
        return match

    @field_validator("values")
    @classmethod
    def _some_values(cls, values: dict[str, float]) -> dict[str, float]:
        if not values:
            raise ValueError(f"give at least one of {', '.join(REPORT_COLUMNS)}")
        return values


def reference_matches(row: ReferenceRow, config: TrialConfig) -> bool:
    """Whether a trial (of some variant) has every value ``row.match`` names."""
    data = config.model_dump(mode="json")
    return all(_contains(get_path(data, path), value) for path, value in row.match.items())


def _contains(actual: Any, wanted: Any) -> bool:
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(_contains(actual.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, (int, float)) and isinstance(actual, (int, float)):
        return float(actual) == float(wanted)
    return actual == wanted


class SweepSpec(TrialConfig):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    experiment: Annotated[str, Field(min_length=1, max_length=200)] = "neural-collapse"
    objective: Objective = Objective()
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    resources: Resources = Resources()
    max_failures: Annotated[int, Field(ge=0, le=100)] = 2
    max_concurrent: Annotated[int, Field(ge=1)] | None = None
    bundle: int | Literal["auto"] = 1
    """Trials per trial bundle (trainables.bundle): grid points that differ only in seed, ETF, SVSL,
    optimizer, schedule or metrics settings train as one stacked model in one Tune trial, each with its
    own MLflow run, checkpoint and (with ``search``) Optuna trial. ``auto``: split each group evenly over
    the concurrent trial slots (with ``search``: a quarter of that, see sweeper.search)."""

    search: SearchSpec | None = None
    """Optional Bayesian search: one Optuna study per grid cell (sweeper.search)."""
    reference: list[ReferenceRow] = []
    """Published results to compare with (``sweeper report``); not part of the sweep's identity."""
    smoke: dict[str, Any] = {}
    """Overrides applied by ``--smoke`` (dotted paths, like ``--set``): an offline dataset, few epochs."""

    @field_validator("bundle", mode="before")
    @classmethod
    def _bundle_size(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096):
            return value
        raise ValueError("must be a number of trials from 1 to 4096, or 'auto'")

    @model_validator(mode="after")
    def _bundled_search(self) -> SweepSpec:
        """Bundled Optuna trials (one study trial per member) may search only what members may vary in,
        and ASHA cannot stop one member of a bundle (it stops whole Tune trials)."""
        if self.search is None or self.bundle == 1:
            return self
        from trainables.bundle import VARYING

        for path in self.search.space:
            if not any(path == v or path.startswith(f"{v}.") for v in VARYING):
                raise ValueError(
                    f"search.space.{path}: bundled trials may search only {', '.join(VARYING)}; "
                    "use bundle: 1 to search it"
                )
        if self.search.prune is not None:
            raise ValueError(
                "search.prune: ASHA stops whole Tune trials, not one member of a bundle; "
                "use bundle: 1 with prune"
            )
        return self

    @field_validator("grid")
    @classmethod
    def _grid_paths_exist(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in grid.items():
            if path != CASES_KEY:
                _check_path(path)
                continue
            for i, case in enumerate(values):
                if not isinstance(case, dict) or not case:
                    raise ValueError(
                        f"grid.{CASES_KEY}[{i}] must be a mapping of trial-config paths to values"
                    )
                for case_path in case:
                    _check_path(case_path)
        return grid


def _check_path(path: str, what: str = "grid key") -> None:
    """Raise ValueError unless ``path`` names a field of TrialConfig (sections may not be grid keys)."""
    model: type[BaseModel] = TrialConfig
    parts = path.split(".")
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "the trial config"
            hint = did_you_mean(path, field_paths(TrialConfig))
            raise ValueError(
                f"{what} '{path}': {where} has no field '{part}'{hint} allowed: {', '.join(fields)}"
            )
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth == len(parts) - 1:
            if is_section:
                sub = ", ".join(f"{path}.{f}" for f in annotation.model_fields)
                raise ValueError(f"{what} '{path}' is a section; use one of its fields: {sub}")
        elif not is_section:
            raise ValueError(f"{what} '{path}': '{'.'.join(parts[: depth + 1])}' has no sub-fields")
        else:
            model = annotation


@dataclass(frozen=True)
class PlannedTrial:
    """One grid point: its stable key, the values that vary across the grid, and its full config."""

    key: str
    index: int
    varying: dict[str, Any]
    config: TrialConfig
    fixed: frozenset[str] = frozenset()
    """Grid keys with one value in the whole grid (``dataset: [digits]``): no part of a run name."""

    def _named(self, keep_fixed: bool = True) -> dict[str, str]:
        """``name=value`` per varying field: the shortest tail of its path that tells it from the other
        varying fields, the value compact; fields with one value in the whole grid are left out (all
        kept when nothing else is left, with ``keep_fixed``)."""
        shown = {k: v for k, v in self.varying.items() if k not in self.fixed}
        if not shown and keep_fixed:
            shown = self.varying
        names = short_names(list(shown))
        return {k: f"{names[k]}={_compact(v)}" for k, v in shown.items()}

    @property
    def run_name(self) -> str:
        """Short and readable at the width of MLflow's runs table: the cell's label and the seed
        (``width=32 seed=0``, ``etf=depth:2 seed=1``); the full dotted paths are the run's params."""
        return " ".join(self._named().values()) or "trial"

    @property
    def cell_label(self) -> str:
        """The grid cell as every client shows it: the run name without the seed (``etf=depth:2``;
        ``all`` when only seeds vary). The ``sweeper.cell`` tag the MLflow view groups by, the variant
        column of ``report`` and ``export``, the Optuna study names and the parent's best-of-cell keys."""
        return " ".join(v for k, v in self._named(keep_fixed=False).items() if k != "seed") or "all"

    @property
    def study_label(self) -> str:
        """A searched cell's label with its seed (each seed has its own study): the run name."""
        return " ".join(self._named().values()) or "all"

    @property
    def label(self) -> str:
        """Every varying value by its full path (``model.mlp.width=32,seed=0``): a searched cell's
        ``sweeper.cell`` tag in sweeps made before ``cell_label`` (their resumed trials still group)."""
        return ",".join(f"{k}={_short(v)}" for k, v in self.varying.items()) or "trial"

    @property
    def cell(self) -> str:
        """The grid cell by full paths, without the seed: a grid trial's ``sweeper.cell`` tag in sweeps
        made before ``cell_label``."""
        return ",".join(f"{k}={_short(v)}" for k, v in self.varying.items() if k != "seed") or "all"


def short_names(paths: list[str]) -> dict[str, str]:
    """Each dotted path's shortest tail of segments that no other path ends with."""
    out = {}
    for path in paths:
        parts = path.split(".")
        others = [p.split(".") for p in paths if p != path]
        for k in range(1, len(parts) + 1):
            if all(o[-k:] != parts[-k:] for o in others):
                break
        out[path] = ".".join(parts[-k:])
    return out


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:{_compact(v)}" for k, v in value.items())
    return _short(value)


def _short(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else str(value)


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _sections(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation may hold (``TrainConfig``, ``SearchSpec | None``, ...)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _sections(arg)]


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted field path of ``model``, sections and their fields alike."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        out.append(path)
        for section in _sections(field.annotation):
            out += field_paths(section, f"{path}.")
    return list(dict.fromkeys(out))


def did_you_mean(given: str, paths: list[str]) -> str:
    """``"; did you mean train.epochs?"`` for ``epochs``: paths ending in what was given, else close spellings
    of the whole path or of its last part; ``";"`` when nothing is close."""
    import difflib

    last = given.rsplit(".", 1)[-1]
    paths = [p for p in paths if not given.startswith(f"{p}.")]  # the sections above it exist already
    found = [p for p in paths if p.rsplit(".", 1)[-1] == last and p != given]
    found = found or difflib.get_close_matches(given, paths, n=3, cutoff=0.75)
    if not found:
        by_last = {}
        for p in paths:
            by_last.setdefault(p.rsplit(".", 1)[-1], p)
        found = [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=3, cutoff=0.8)]
    return f"; did you mean {' or '.join(found[:3])}?" if found else ";"


NAME_RULE = "1-100 letters, digits, '_', '.' or '-', starting with a letter or digit"


def _allowed_fields(loc: tuple) -> list[str] | None:
    """Field names allowed at the parent of ``loc`` in a SweepSpec, for 'unknown field' messages."""
    model: type[BaseModel] = SweepSpec
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return list(model.model_fields)


def format_validation_error(
    source: str, err: ValidationError, prefix: tuple = (), origins: dict[str, str] | None = None
) -> str:
    """One line per problem, naming where the value came from: the file, or the ``--set`` argument (or
    ``smoke:`` entry) in ``origins`` (dotted path -> how it was given) that set the field or a section
    above it."""
    lines = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(tuple(e["loc"]))
            where = _format_loc(loc)
            msg = "unknown field" + did_you_mean(where, field_paths(SweepSpec)).rstrip(";")
            msg += f"; allowed: {', '.join(allowed)}" if allowed else ""
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"a section: give a mapping of its fields (got {_short(e.get('input'))[:80]})"
        elif e["type"] == "string_pattern_mismatch" and tuple(e["loc"]) == ("name",):
            msg = f"{NAME_RULE} (got {e.get('input')!r})"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], (dict, list)):  # not a whole grid
                msg += f" (got {e['input']!r})"
        lines.append(f"{_origin(source, loc, origins or {})}: {_format_loc(loc)}: {msg}")
    return "\n".join(lines)


def _origin(source: str, loc: tuple, origins: dict[str, str]) -> str:
    dotted = ".".join(str(part) for part in loc)
    for path in sorted(origins, key=len, reverse=True):
        if dotted == path or dotted.startswith(f"{path}.") or path.startswith(f"{dotted}."):
            return origins[path]
    return source


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["train.epochs=2", "grid.seed=[0, 1]"]`` -> pairs; values are parsed as YAML."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_.]+)*", key):
            raise SpecError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. train.epochs=2")
        try:
            out.append((key, yaml.safe_load(raw)))
        except yaml.YAMLError as err:
            raise SpecError(f"--set {item!r}: value is not valid YAML: {err}") from None
    return out


@dataclass(frozen=True)
class LoadedSpec:
    spec: SweepSpec
    path: str
    """Where the spec was read from (a file, or ``<sweep dir>/spec.yaml``): the prefix of every error."""
    resolved: dict[str, Any]
    """The spec after overrides, with every default filled in: what is frozen in the sweep directory."""

    @property
    def hash(self) -> str:
        return spec_hash(self.resolved)


def spec_hash(resolved: dict[str, Any]) -> str:
    # Published numbers to compare with change no trial: adding them (or clearing them for --smoke) does
    # not make another sweep.
    data = {k: v for k, v in resolved.items() if k != "reference"}
    if isinstance(data.get("smoke"), dict) and "reference" in data["smoke"]:
        data["smoke"] = {k: v for k, v in data["smoke"].items() if k != "reference"}
    return identity_hash(data, 16)


def identity_hash(resolved: dict[str, Any], length: int) -> str:
    """Digest of a resolved spec or trial config, without the :data:`ADDED_FIELDS` at their defaults."""
    data = copy.deepcopy(resolved)
    for path, default in ADDED_FIELDS.items():
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node and node[last] == default:
            del node[last]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]


def load_spec(
    path: str | Path, overrides: list[str] = (), name: str | None = None, smoke: bool = False
) -> LoadedSpec:
    """Read, override and validate a spec, and check that every grid point is a valid trial.

    Raises:
        SpecError: with one line per problem, each naming the file and the field path.
    """
    source = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SpecError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{source}: cannot read spec: {err}") from None
    return load_spec_text(text, source, overrides, name, smoke)


class DuplicateKeyError(yaml.YAMLError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(f"line {line}: key {key!r} appears twice (first on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_frozen_spec(sweep_dir) -> LoadedSpec:
    """The spec frozen in a sweep directory (a ``sweeper.location.Location``, which may be remote).

    Its reference rows are not checked against its grid again: they were checked against the file's own
    grid when the sweep started, and a grid narrowed by ``--set`` leaves some of them without a variant
    (the report leaves those out and says so)."""
    return load_spec_text(sweep_dir.read_text("spec.yaml"), f"{sweep_dir}/spec.yaml", check_references=False)


def load_spec_text(
    text: str,
    source: str,
    overrides: list[str] = (),
    name: str | None = None,
    smoke: bool = False,
    check_references: bool = True,
) -> LoadedSpec:
    """``load_spec`` on text already read. ``check_references``: refuse a reference row that matches no
    variant of the grid the text itself gives (before ``--set`` or ``smoke:`` narrow it)."""
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKeyError as err:
        raise SpecError(f"{source}: {err}; a mapping names each key once") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{source}: not valid YAML: {err}") from None
    if data is None:
        raise SpecError(
            f"{source}: the spec is empty; it needs at least 'name' (see search_spaces/quickstart.yaml)"
        )
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a mapping of fields, got {type(data).__name__}")
    pairs = parse_overrides(list(overrides))
    if smoke:
        section = data.get("smoke") or {}
        if not isinstance(section, dict) or not section:
            raise SpecError(f"{source}: smoke: --smoke needs a 'smoke:' mapping of overrides in the spec")
        pairs = list(section.items()) + pairs
    as_written = copy.deepcopy(data)
    smoke_keys = len(pairs) - len(overrides)
    origins = {}
    for i, (key, value) in enumerate(pairs):
        origins[key] = f"{source}: smoke: {key}" if i < smoke_keys else f"--set {overrides[i - smoke_keys]}"
        keyed = next((m for m in MAPS_OF_PATHS if key.startswith(f"{m}.")), None)
        if keyed is not None and isinstance(get_path(data, keyed) or {}, dict):
            # Grid and search-space keys are themselves dotted paths: grid.model.mlp.width names one entry.
            entries = get_path(data, keyed)
            if entries is None:
                set_path(data, keyed, entries := {})
            entries[key[len(keyed) + 1 :]] = value
        else:
            try:
                set_path(data, key, value)
            except (AttributeError, TypeError):
                raise SpecError(
                    f"{origins[key]}: {key.rsplit('.', 1)[0]} is a single value, not a section"
                ) from None
    if name is not None:
        data["name"] = name
    elif smoke and "name" not in (data.get("smoke") or {}) and isinstance(data.get("name"), str):
        # Its own sweep: the real run of the spec afterwards is not refused as a changed spec.
        data["name"] = f"{data['name']}-smoke"
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(source, err, origins=origins)) from None
    loaded = LoadedSpec(spec, source, spec.model_dump(mode="json", by_alias=True))
    trials = expand(loaded)  # every grid point must be a valid trial before anything starts
    if spec.search is not None:
        check_search(loaded, trials)
    if check_references:
        check_reference(loaded, _trials_of_written_grid(loaded, as_written, trials))
    return loaded


def _trials_of_written_grid(
    loaded: LoadedSpec, as_written: dict[str, Any], trials: list[PlannedTrial]
) -> list[PlannedTrial]:
    """The trials of the spec with the grid its text gives and every other override kept: reference rows
    describe the paper's table, which a grid narrowed to try one variant first still belongs to. The
    narrowed trials when the text's own grid is the same or does not expand on its own."""
    written = as_written.get("grid", {})
    if written == loaded.resolved.get("grid") or not isinstance(written, dict):
        return trials
    data = {**copy.deepcopy(loaded.resolved), "grid": written}
    try:
        return expand(LoadedSpec(SweepSpec.model_validate(data), loaded.path, data))
    except (ValidationError, SpecError):
        return trials


def check_reference(loaded: LoadedSpec, trials: list[PlannedTrial]) -> None:
    """Every reference row must match at least one variant of the grid (else it compares with nothing)."""
    errors = []
    cells = list(dict.fromkeys(t.cell_label for t in trials))
    for i, row in enumerate(loaded.spec.reference):
        if not any(reference_matches(row, t.config) for t in trials):
            shown = ", ".join(cells[:8]) + (f" (and {len(cells) - 8} more)" if len(cells) > 8 else "")
            errors.append(
                f"{loaded.path}: reference[{i}].match: {_short(row.match)} matches no variant of the grid; "
                f"its variants: {shown}"
            )
    if errors:
        raise SpecError("\n".join(errors))


def check_search(loaded: LoadedSpec, trials: list[PlannedTrial]) -> None:
    """Every cell must accept the searched values at both ends of their ranges (and every choice)."""
    space = loaded.spec.search.space
    clash = sorted(set(space) & set(loaded.spec.grid))
    if clash:
        raise SpecError(f"{loaded.path}: search.space: {', '.join(clash)} is both searched and in the grid")
    settings: list[dict[str, Any]] = []
    for pick in (0, -1):
        settings.append({path: dist.extremes()[pick] for path, dist in space.items()})
    for path, dist in space.items():
        settings += [{path: value} for value in dist.extremes()]
    errors: list[str] = []
    for trial in trials:
        for setting in settings:
            data = trial.config.model_dump(mode="json")
            for path, value in setting.items():
                set_path(data, path, value)
            try:
                config = TrialConfig.model_validate(data)
            except ValidationError as err:
                problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            else:
                problem = _model_problem(config)
            if problem:
                where = f"cell {trial.run_name}: " if trial.varying else ""
                msg = f"{loaded.path}: search.space: {where}values {setting} are not allowed: {problem}"
                if msg not in errors:
                    errors.append(msg)
    if errors:
        raise SpecError("\n".join(errors))


def _model_problem(config: TrialConfig) -> str | None:
    """Check what only the built model knows (ETF depth, SVSL gamma, input shape) on the meta device."""
    import torch

    from trainables.data import dataset_info
    from trainables.models import ModelConfigError, build_model

    try:
        with torch.device("meta"):
            build_model(config, dataset_info(config))
    except ModelConfigError as err:
        return str(err)
    return None


def _assignments(grid: dict[str, list[Any]]) -> list[list[tuple[str, list[tuple[str, Any]]]]]:
    """Per grid key, its choices; each choice is (where, [(path, value), ...]). A plain key assigns one
    path; ``cases`` assigns several paths together (e.g. an architecture with the dataset it is paired
    with in a paper), so specs need not take the full product of the two."""
    out = []
    for key, values in grid.items():
        if key == CASES_KEY:
            out.append([(f"grid.{key}[{i}]", list(case.items())) for i, case in enumerate(values)])
        else:
            out.append([(f"grid.{key}[{i}]", [(key, value)]) for i, value in enumerate(values)])
    return out


def max_trials() -> int:
    raw = os.environ.get(MAX_TRIALS_ENV)
    if raw is None:
        return DEFAULT_MAX_TRIALS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SpecError(f"{MAX_TRIALS_ENV}={raw!r}: must be a positive whole number of trials")
    return value


def check_grid_size(loaded: LoadedSpec, assignments: list[list[Any]]) -> None:
    """Count the grid's product from its keys' lengths (nothing expanded) and refuse one past the limit."""
    sizes = {key: len(choices) for key, choices in zip(loaded.spec.grid, assignments)}
    total = math.prod(sizes.values())
    limit = max_trials()
    if total > limit:
        shown = " x ".join(f"{key} ({n})" for key, n in sizes.items())
        raise SpecError(
            f"{loaded.path}: grid: {shown} = {total:,} trials, more than the limit of {limit:,}; "
            f"make the grid smaller (or set {MAX_TRIALS_ENV} to raise the limit)"
        )


def model_key(data: dict[str, Any]) -> str:
    """What building the model depends on: the trial config without the fields it never reads."""
    data = {k: v for k, v in data.items() if k not in ("seed", "metrics", "checkpoint", "device")}
    data["train"] = {k: v for k, v in data.get("train", {}).items() if k not in MODEL_FREE_TRAIN_FIELDS}
    data["svsl"] = {k: v for k, v in data.get("svsl", {}).items() if k != "alpha"}
    return json.dumps(data, sort_keys=True)


MODEL_FREE_TRAIN_FIELDS = ("optimizer", "schedule", "epochs", "compile")
"""Trial fields no model build reads: ``plan`` and ``validate`` build one model per distinct rest."""


def expand(loaded: LoadedSpec) -> list[PlannedTrial]:
    """One :class:`PlannedTrial` per combination of the grid's values, in a stable order."""
    spec = loaded.spec
    base = {k: v for k, v in loaded.resolved.items() if k in TRIAL_FIELDS}
    trials, errors = [], []
    assignments = _assignments(spec.grid)
    check_grid_size(loaded, assignments)
    built: dict[str, str | None] = {}  # model problems by _build_key: seeds and lrs share one build
    for index, combo in enumerate(itertools.product(*assignments)):
        data = json.loads(json.dumps(base))
        varying: dict[str, Any] = {}
        for _, pairs in combo:
            for path, value in pairs:
                set_path(data, path, value)
                varying[path] = value
        try:
            config = TrialConfig.model_validate(data)
        except ValidationError as err:
            for e in err.errors():
                loc = ".".join(str(p) for p in e["loc"])
                where = next(
                    (
                        w if len(pairs) == 1 else f"{w}.{path}"
                        for w, pairs in combo
                        for path, _ in pairs
                        if loc == path or loc.startswith(path + ".")
                    ),
                    loc,
                )
                msg = f"{loaded.path}: {where}: {e['msg']} (got {e.get('input')!r})"
                if msg not in errors:
                    errors.append(msg)
            continue
        build = model_key(data)
        if build not in built:
            built[build] = _model_problem(config)
        if problem := built[build]:
            described = ",".join(f"{k}={_short(v)}" for k, v in varying.items())
            msg = f"{loaded.path}: " + (f"trial {described}: " if varying else "") + problem
            if msg not in errors:
                errors.append(msg)
            continue
        key = identity_hash(config.model_dump(mode="json"), 12)
        trials.append(PlannedTrial(key, index, varying, config))
    if errors:
        raise SpecError("\n".join(errors))
    values: dict[str, set[str]] = {}
    for trial in trials:
        for path, value in trial.varying.items():
            values.setdefault(path, set()).add(_short(value))
    fixed = frozenset(path for path, seen_values in values.items() if len(seen_values) == 1)
    trials = [dataclasses.replace(t, fixed=fixed) for t in trials] if len(trials) > 1 else trials
    seen: dict[str, PlannedTrial] = {}
    for t in trials:
        if t.key in seen:
            raise SpecError(
                f"{loaded.path}: grid: grid points {seen[t.key].index} and {t.index} are the same trial "
                f"({t.run_name}); remove the duplicate value"
            )
        seen[t.key] = t
    return trials
