"""Spec parsing, grid expansion, every rejection, and the CLI's bad-input contract (exit 2, no traceback,
nothing written)."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from sweeper.cli import main
from sweeper.location import parse_location
from sweeper.orchestrate import prepare_sweep_dir
from sweeper.spec import ADDED_FIELDS, SpecError, SweepSpec, expand, load_spec, load_spec_text

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"

MINIMAL = """
name: t
dataset: gaussian
data: {gaussian: {classes: 3, dim: 8}}
model: {mlp: {depth: 3, width: 16}}
train: {epochs: 2}
grid:
  seed: [0, 1]
  model.mlp.width: [8, 16]
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_quickstart_expands_to_six_trials():
    trials = expand(load_spec(QUICKSTART))
    assert len(trials) == 6
    assert len({t.key for t in trials}) == 6
    assert trials[0].varying == {"model.mlp.width": 32, "seed": 0}
    assert trials[0].config.train.epochs == 30


def test_run_names_use_the_shortest_unambiguous_field_names():
    from sweeper.spec import PlannedTrial, short_names

    assert short_names(["model.mlp.width", "model.convnet.width", "train.optimizer.lr", "seed"]) == {
        "model.mlp.width": "mlp.width",
        "model.convnet.width": "convnet.width",
        "train.optimizer.lr": "lr",
        "seed": "seed",
    }
    trial = PlannedTrial("k", 0, {"etf": {"depth": 2}, "seed": 1, "train.optimizer.lr": 0.01}, None)
    assert trial.run_name == "etf=depth:2 seed=1 lr=0.01"
    assert PlannedTrial("k", 0, {}, None).run_name == "trial"


def test_run_names_leave_out_grid_fields_with_one_value(tmp_path):
    # `dataset: [digits]` in a grid does not vary: first in the name, it pushed what does vary out of
    # the runs table's width.
    spec = yaml.safe_load(MINIMAL)
    spec["grid"] = {"dataset": ["digits"], **spec["grid"]}
    trials = expand(load_spec(write(tmp_path, yaml.safe_dump(spec))))
    assert [t.run_name for t in trials][:2] == ["width=8 seed=0", "width=8 seed=1"]  # safe_dump sorts keys
    # A grid of one point keeps its values rather than naming its run "trial".
    spec["grid"] = {"dataset": ["digits"], "seed": [0]}
    (only,) = expand(load_spec(write(tmp_path, yaml.safe_dump(spec))))
    assert only.run_name == "dataset=digits seed=0"


def test_grid_values_override_base_and_keys_are_stable(tmp_path):
    path = write(tmp_path, MINIMAL)
    trials = expand(load_spec(path))
    assert [(t.config.seed, t.config.model.mlp.width) for t in trials] == [(0, 8), (0, 16), (1, 8), (1, 16)]
    assert [t.key for t in trials] == [t.key for t in expand(load_spec(path))]
    assert trials[1].run_name == "seed=0 width=16"  # short at table width; params keep the full paths
    # One readable label per cell for every client (the run name without its seed); sweeps made before
    # it keep tagging by full paths, so their resumed trials still group with the earlier ones.
    assert trials[1].cell_label == "width=16" and trials[1].study_label == "seed=0 width=16"
    assert trials[1].cell == "model.mlp.width=16"


def test_cell_labels_leave_out_single_valued_fields_and_compact_values(tmp_path):
    from sweeper.orchestrate import grid_points

    spec = yaml.safe_load(MINIMAL)
    spec["grid"] = {"dataset": ["digits"], "etf": [{"depth": 0}, {"depth": 2}], "seed": [0, 1]}
    trials = expand(load_spec(write(tmp_path, yaml.safe_dump(spec))))
    assert [t.cell_label for t in trials] == ["etf=depth:0"] * 2 + ["etf=depth:2"] * 2
    assert [t.run_name for t in trials][:2] == ["etf=depth:0 seed=0", "etf=depth:0 seed=1"]
    assert [p.cell for p in grid_points(trials)] == [t.cell_label for t in trials]
    assert grid_points(trials, readable=False)[0].cell == 'dataset=digits,etf={"depth":0}'
    spec["grid"] = {"seed": [0, 1]}  # only seeds vary: one variant
    assert {t.cell_label for t in expand(load_spec(write(tmp_path, yaml.safe_dump(spec))))} == {"all"}


def test_key_label_is_a_valid_mlflow_key():
    from mlflow.utils.validation import _validate_metric_name

    from sweeper.tracking import key_label

    for label in ["etf=depth:1,kind:adaptive seed=0", 'data.root=/x/y name="a b" l=[1,2]', "all"]:
        _validate_metric_name(f"best_value/{key_label(label)}")
    assert key_label("etf=depth:1,kind:adaptive seed=0") == "etf:depth:1 kind:adaptive seed:0"


def test_overrides_and_name(tmp_path):
    loaded = load_spec(write(tmp_path, MINIMAL), ["train.epochs=5", "grid.seed=[3]"], name="other")
    assert loaded.spec.name == "other"
    assert loaded.spec.train.epochs == 5
    assert [t.config.seed for t in expand(loaded)] == [3, 3]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("name: t\nmodle: {}\n", r"spec.yaml: modle: unknown field; did you mean model\?; allowed: .*model"),
        (
            "name: t\ntrain: {epochs: 2, lr: 0.1}\n",
            r"spec.yaml: train.lr: unknown field; did you mean train.optimizer.lr\?; allowed: epochs, batch_size",
        ),
        ("name: t\ntrain: {epochs: many}\n", r"spec.yaml: train.epochs: .*integer.*'many'"),
        (
            "name: t\ntrain: {epochs: 0}\n",
            r"spec.yaml: train.epochs: Input should be greater than or equal to 1",
        ),
        (
            "name: t\ndataset: imagenet\n",
            r"spec.yaml: dataset: Input should be 'digits', 'gaussian', 'mnist1d', 'mnist', 'fashion_mnist'",
        ),
        (
            "name: t\ntrain: {optimizer: {lr: -1}}\n",
            r"spec.yaml: train.optimizer.lr: Input should be greater than 0",
        ),
        ("train: {epochs: 2}\n", r"spec.yaml: name: required field is missing"),
        (
            "name: 'bad name!'\n",
            r"spec.yaml: name: 1-100 letters, digits, '_', '.' or '-', starting with a letter or digit \(got 'bad name!'\)",
        ),
        ("name: t\ngrid: {seed: []}\n", r"spec.yaml: grid.seed: List should have at least 1 item"),
        (
            "name: t\ngrid: {model.mlp.widht: [1]}\n",
            r"grid key 'model.mlp.widht': model.mlp has no field 'widht'; did you mean model.mlp.width or model.mlp.depth\? allowed: preset, depth, width",
        ),
        ("name: t\ngrid: {model: [1]}\n", r"grid key 'model' is a section"),
        (
            "name: t\ngrid: {seed: [0, -1]}\n",
            r"spec.yaml: grid.seed\[1\]: Input should be greater than or equal to 0",
        ),
        ("name: t\ngrid: {model.mlp.width: [8, x]}\n", r"spec.yaml: grid.model.mlp.width\[1\]: .*integer"),
        ("name: t\ngrid: {seed: [1, 1]}\n", r"grid points 0 and 1 are the same trial"),
        (
            "name: t\nobjective: {metric: accuracy}\n",
            r"spec.yaml: objective.metric: Input should be 'test_acc'",
        ),
        (
            "name: t\nresources: {gpu: -1}\n",
            r"spec.yaml: resources.gpu: .*from 0 to 64 \(a fraction packs trials\), or .auto. \(got -1\)",
        ),
        (
            "name: t\ntrain: {schedule: {milestones: [5, 3]}}\n",
            r"spec.yaml: train.schedule: .*strictly increasing",
        ),
        ("name: t\nbundle: 0\n", r"spec.yaml: bundle: .*from 1 to 4096, or 'auto' \(got 0\)"),
        ("name: t\nbundle: some\n", r"spec.yaml: bundle: .*from 1 to 4096, or 'auto' \(got 'some'\)"),
        (
            "name: t\nbundle: 4\nsearch: {space: {model.mlp.width: {int: [8, 64]}}}\n",
            r"spec.yaml: .*search.space.model.mlp.width: bundled trials may search only seed, etf, svsl",
        ),
        (
            "name: t\nbundle: auto\nsearch: {space: {svsl.alpha: {uniform: [0, 1]}}, prune: {}}\n",
            r"spec.yaml: .*search.prune: ASHA stops whole Tune trials, not one member of a bundle",
        ),
        ("", r"spec.yaml: the spec is empty"),
        ("- a\n- b\n", r"spec.yaml: the spec must be a mapping"),
        ("name: [unclosed\n", r"spec.yaml: not valid YAML"),
        ("name: a\nname: b\n", r"spec.yaml: line 2: key 'name' appears twice \(first on line 1\)"),
        (
            "name: t\ntrain:\n  epochs: 2\n  epochs: 3\n",
            r"spec.yaml: line 4: key 'epochs' appears twice \(first on line 3\); a mapping names each",
        ),
    ],
)
def test_rejections_name_file_and_field(tmp_path, text, expected):
    with pytest.raises(SpecError, match=expected):
        load_spec(write(tmp_path, text))


HUGE_GRID = """
name: t
dataset: gaussian
grid:
  seed: {seeds}
  train.optimizer.lr: {lrs}
  train.optimizer.momentum: {momenta}
  train.optimizer.weight_decay: {decays}
"""


def _huge(seeds=1000, lrs=100, momenta=100, decays=1000):
    return HUGE_GRID.format(
        seeds=list(range(seeds)),
        lrs=[0.001 * (i + 1) for i in range(lrs)],
        momenta=[i / momenta for i in range(momenta)],
        decays=[1e-6 * i for i in range(decays)],
    )


def test_an_enormous_grid_is_refused_before_it_is_expanded(tmp_path, monkeypatch):
    """10^10 trials: counted from the keys' lengths, refused naming each key and the product (it used to
    keep validate busy past 30 s); SWEEPER_MAX_TRIALS moves the limit, and must be a number."""
    monkeypatch.delenv("SWEEPER_MAX_TRIALS", raising=False)
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, _huge()))
    assert str(err.value) == (
        f"{tmp_path / 'spec.yaml'}: grid: seed (1000) x train.optimizer.lr (100) x "
        "train.optimizer.momentum (100) x train.optimizer.weight_decay (1000) = 10,000,000,000 trials, "
        "more than the limit of 20,000; make the grid smaller (or set SWEEPER_MAX_TRIALS to raise the limit)"
    )
    small = _huge(seeds=3, lrs=2, momenta=2, decays=2)
    monkeypatch.setenv("SWEEPER_MAX_TRIALS", "20")
    with pytest.raises(SpecError, match=r"= 24 trials, more than the limit of 20"):
        load_spec(write(tmp_path, small))
    monkeypatch.setenv("SWEEPER_MAX_TRIALS", "24")
    assert len(expand(load_spec(write(tmp_path, small)))) == 24
    monkeypatch.setenv("SWEEPER_MAX_TRIALS", "lots")
    with pytest.raises(SpecError, match=r"SWEEPER_MAX_TRIALS='lots': must be a positive whole number"):
        load_spec(write(tmp_path, small))


def test_trials_that_build_the_same_model_build_it_once(tmp_path, monkeypatch):
    """Seeds and optimizer settings do not change the model: validation builds one per distinct rest."""
    import sweeper.spec

    built = []
    real = sweeper.spec._model_problem

    def counting(config):
        built.append(config)
        return real(config)

    monkeypatch.setattr(sweeper.spec, "_model_problem", counting)
    loaded = load_spec(write(tmp_path, _huge(seeds=4, lrs=3, momenta=2, decays=1)))
    built.clear()
    assert len(expand(loaded)) == 24 and len(built) == 1
    loaded = load_spec(write(tmp_path, MINIMAL + "  etf: [{depth: 0}, {depth: 1}]\n"))
    built.clear()
    assert len(expand(loaded)) == 8
    assert len(built) == 4  # width x etf; seed shares

    # plan counts parameters and memory once per distinct model too, with the same numbers per trial.
    import sweeper.plan

    builds = []
    real_build = sweeper.plan.build_model
    monkeypatch.setattr(sweeper.plan, "build_model", lambda *a: builds.append(a) or real_build(*a))
    rows = sweeper.plan.plan_rows(load_spec(write(tmp_path, _huge(seeds=4, lrs=3, momenta=2, decays=1))))
    assert len(rows) == 24 and len(builds) == 1
    assert len({(r["trainable_params"], r["memory_mib"]) for r in rows}) == 1


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match=r"nope.yaml: no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_bad_override(tmp_path):
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        load_spec(write(tmp_path, MINIMAL), ["train.epochs"])


@pytest.mark.parametrize("verb", ["validate", "plan", "run"])
def test_cli_bad_input_exits_2_without_traceback_or_writes(tmp_path, verb):
    spec = write(tmp_path, "name: t\ntrain: {epochs: -3}\n")
    storage = tmp_path / "storage"
    args = [sys.executable, "-m", "sweeper", verb, str(spec)]
    if verb == "run":
        args += ["--storage", str(storage)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {spec}: train.epochs: Input should be greater than or equal to 1 (got -3)"
    ]
    assert not storage.exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_gpu_request_without_gpu_is_refused_before_anything_starts(tmp_path, capsys):
    spec = write(tmp_path, MINIMAL + "resources: {gpu: 0.5}\n")
    storage = tmp_path / "storage"
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["run", str(spec), "--storage", str(storage)]) == 2
    assert "resources.gpu: 0.5 requested but this machine has no CUDA GPU" in capsys.readouterr().err
    assert not storage.exists()


@pytest.mark.gpu
def test_gpu_fraction_too_small_for_a_trial_is_refused(tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    spec = write(tmp_path, MINIMAL + "resources: {gpu: 0.001}\n")
    storage = tmp_path / "storage"
    assert main(["run", str(spec), "--storage", str(storage)]) == 2
    assert "resources.gpu: 0.001 packs 1000 trials per GPU" in capsys.readouterr().err
    assert not storage.exists()


def test_validate_ok(capsys):
    assert main(["validate", str(QUICKSTART)]) == 0
    assert "valid; 6 trials" in capsys.readouterr().out


def test_plan_json_counts_parameters(capsys):
    assert main(["plan", str(QUICKSTART), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6
    # digits: 64 inputs, 10 classes; width 32, depth 4: 3 hidden Linear+BN blocks and the classifier.
    w = 32
    expected = (64 * w + w) + 2 * (w * w + w) + 3 * (2 * w) + (w * 10 + 10)
    assert rows[0] == {
        "trial": 0,
        "key": rows[0]["key"],
        "run_name": "width=32 seed=0",
        "model.mlp.width": 32,
        "seed": 0,
        "trainable_params": expected,
        "total_params": expected,
        "memory_mib": rows[0]["memory_mib"],
    }
    # trainables.memory: the CUDA context allowance plus a few MiB for digits and a small MLP.
    assert 600 <= rows[0]["memory_mib"] < 700


def test_plan_text(capsys):
    assert main(["plan", str(QUICKSTART)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and "trainable_params=" in lines[0]


def test_bundle_sizes_for_the_memory_check_before_a_packed_sweep(tmp_path):
    """The memory check before a packed sweep sizes bundles as the sweep will: the grid splits each group
    over the slots, a search asks a quarter of that (sweeper.search.AUTO_ROUNDS)."""
    from sweeper.orchestrate import bundle_points, grid_points, members_per_trial, trial_slots

    grid = "name: t\ngrid: {seed: [0, 1, 2, 3, 4, 5], dataset: [gaussian, digits]}\nresources: {gpu: 0.25}\n"
    one_gpu = {"GPU": 1, "CPU": 2}
    sizes = {}
    for bundle in ("auto", 4, 1):
        loaded = load_spec(write(tmp_path, grid + f"bundle: {bundle}\n"))
        trials = expand(loaded)
        slots = trial_slots(loaded, one_gpu)
        assert slots == 4  # four quarter-GPU trials
        sizes[bundle] = members_per_trial(loaded, trials, slots)
        points = grid_points(trials)
        made = bundle_points(points, [t.config for t in trials], bundle, slots) if bundle != 1 else points
        assert max(len(getattr(p, "members", [p])) for p in made) == sizes[bundle]
    # Two groups (datasets) of 6 seeds: auto puts 6 over 4 slots, 2 per bundle.
    assert sizes == {"auto": 2, 4: 4, 1: 1}

    search = (
        "name: t\ngrid: {seed: [0, 1]}\nresources: {gpu: 0.25}\nbundle: auto\n"
        "search: {optuna: {trials_per_cell: 10, max_concurrent: 2}, space: {svsl.alpha: {uniform: [0, 1]}}}\n"
    )
    loaded = load_spec(write(tmp_path, search))
    slots = trial_slots(loaded, one_gpu)
    assert slots == 2  # the search's own concurrency limit
    # 2 cells x 10 trials in one group over 2 slots, in at least 4 rounds: ceil(20 / 8).
    assert members_per_trial(loaded, expand(loaded), slots) == 3


def _models_in(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _field_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        out.add(path)
        for sub in _models_in(field.annotation):
            out |= _field_paths(sub, path + ".")
    return out


def test_every_field_added_since_identities_froze_is_registered_with_its_default():
    """A field added without an ADDED_FIELDS entry would change every sweep's spec hash and trial keys:
    sweeps started before the upgrade could no longer resume."""
    lines = (ROOT / "tests" / "spec_fields.txt").read_text().splitlines()
    frozen = {line for line in lines if line and not line.startswith("#")}
    new = _field_paths(SweepSpec) - frozen
    # The sub-fields of an added field came with it (``reference.source`` with ``reference``).
    missing = sorted(
        p for p in new - set(ADDED_FIELDS) if not any(p.startswith(f"{a}.") for a in ADDED_FIELDS)
    )
    assert not missing, f"add {missing} to sweeper.spec.ADDED_FIELDS with their defaults"
    resolved = load_spec_text(MINIMAL, "spec.yaml").resolved
    for path, default in ADDED_FIELDS.items():
        node = resolved
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        assert node is None or node == default, (path, node, default)


def test_a_sweep_frozen_before_a_field_existed_keeps_its_identity(tmp_path, monkeypatch):
    """As if ``train.compile`` had been added after a sweep started: the old version froze a spec without
    it and hashed that; the new version, reading the frozen spec back, computes the same spec hash and
    trial keys, so the sweep directory accepts it and MLflow runs are found again. A value other than
    the default is a different spec."""
    monkeypatch.setitem(ADDED_FIELDS, "train.compile", "auto")
    resolved = load_spec_text(MINIMAL, "spec.yaml").resolved

    def without_added(data):  # the version before every registered field existed
        data = copy.deepcopy(data)
        for path in ADDED_FIELDS:
            *parents, last = path.split(".")
            node = data
            for part in parents:
                node = node.get(part, {})
            node.pop(last, None)
        return data

    old = without_added(resolved)

    def digest(data, length):  # what the version without the field computed
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]

    frozen = load_spec_text(yaml.safe_dump(old), "sweeps/t/spec.yaml")
    assert frozen.resolved["train"]["compile"] == "auto"
    assert frozen.hash == digest(old, 16)
    old_keys = []
    for trial in expand(frozen):
        old_keys.append(digest(without_added(trial.config.model_dump(mode="json")), 12))
    assert [t.key for t in expand(frozen)] == old_keys

    sweep_dir = parse_location(tmp_path / "t")
    sweep_dir.write_text("spec.yaml", yaml.safe_dump(old, sort_keys=False))
    sweep_dir.write_text("sweep.json", json.dumps({"spec_hash": digest(old, 16), "sweep_id": "s"}))
    assert prepare_sweep_dir(frozen, sweep_dir, "sqlite:///unused.db")["sweep_id"] == "s"

    compiled = load_spec_text(MINIMAL, "spec.yaml", ["train.compile='on'"])
    with pytest.raises(SpecError, match="changed: train.compile"):
        prepare_sweep_dir(compiled, sweep_dir, "sqlite:///unused.db")
