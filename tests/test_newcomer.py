"""A newcomer's plausible mistakes (issue 29), each run as a user runs it: the CLI in a subprocess, its
output and exit status checked. None may end in a traceback or a long silent wait, and a refused command
writes nothing."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.services import mlflow_uri

pytestmark = pytest.mark.slow  # runs sweeps and the CLI in subprocesses

ROOT = Path(__file__).resolve().parent.parent
SPEC = {
    "name": "first",
    "experiment": "newcomer",
    "dataset": "gaussian",
    "data": {"gaussian": {"classes": 3, "dim": 6, "train_per_class": 30, "test_per_class": 10}},
    "model": {"mlp": {"depth": 3, "width": 8}},
    "train": {"epochs": 2, "batch_size": 32},
    "checkpoint": {"every": 1},
    "resources": {"cpu": 1},
}
TRIAL = {k: SPEC[k] for k in ("dataset", "data", "model", "train", "checkpoint")}


def _run(cwd, *args, uri=None, module="sweeper", timeout=300, stdout=subprocess.PIPE):
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )


def _clean(proc, status):
    """One message, the exit status asked for, no traceback."""
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One finished sweep of one trial, run by the CLI."""
    tmp = tmp_path_factory.mktemp("newcomer")
    (tmp / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    uri = mlflow_uri(tmp)
    proc = _run(tmp, "run", "spec.yaml", uri=uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A local Ray keeps its token authentication without a WARNING that asks nothing of the user.
    assert "Token authentication" not in proc.stderr + proc.stdout
    return tmp, uri


# ---- 1. tracebacks from plausible actions ---------------------------------------------------------------
def test_report_into_a_file_is_refused_naming_it(sweep):
    tmp, uri = sweep
    (tmp / "run1.out").write_text("mine\n")
    proc = _run(tmp, "report", "first", "--out", "run1.out", uri=uri)
    _clean(proc, 2)
    assert "--out run1.out is a file" in proc.stderr
    assert (tmp / "run1.out").read_text() == "mine\n"


@pytest.mark.parametrize(
    "args", [["plan", "spec.yaml"], ["status", "first"], ["validate", "spec.yaml"], ["report", "first"]]
)
def test_a_reader_that_stops_early_ends_the_command_quietly(sweep, args):
    # `sweeper plan spec.yaml | head -1`: the reader is gone before the first line is written.
    tmp, uri = sweep
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeper", *args],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr  # as for `git log | head -1`: 128 + SIGPIPE
    assert stderr == "", stderr


def test_a_yaml_given_as_checkpoint_says_it_is_not_one(tmp_path):
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(TRIAL))
    proc = _run(tmp_path, "trial.yaml", "--checkpoint", "trial.yaml", module="trainables")
    _clean(proc, 2)
    assert "trial.yaml: not a checkpoint: torch cannot read it" in proc.stderr
    assert yaml.safe_load((tmp_path / "trial.yaml").read_text()) == TRIAL


def test_a_sweeps_checkpoint_continues_outside_the_sweep_with_from_and_is_never_written(sweep, tmp_path):
    src, _ = sweep
    (checkpoint,) = (src / "sweeps" / "first" / "checkpoints").glob("*.pt")
    before = checkpoint.read_bytes()
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(TRIAL))
    # As --checkpoint (a file to write): refused, saying what it is and what to do.
    refused = _run(tmp_path, "trial.yaml", "--checkpoint", checkpoint, module="trainables")
    _clean(refused, 2)
    assert "a sweep's checkpoint (epoch 2)" in refused.stderr and f"--from {checkpoint}" in refused.stderr
    # With --from: the trial continues from the sweep's epoch 2 and saves to its own file.
    own = tmp_path / "mine.pt"
    longer = _run(
        tmp_path,
        "trial.yaml",
        "--from",
        checkpoint,
        "--checkpoint",
        own,
        "--set",
        "train.epochs=3",
        module="trainables",
    )
    _clean(longer, 0)
    assert [yaml.safe_load(line).get("epoch") for line in longer.stdout.splitlines()] == [3, None]
    assert checkpoint.read_bytes() == before and own.exists()


# ---- 2. silent waits --------------------------------------------------------------------------------------
def test_a_tracking_server_that_is_not_there_fails_in_seconds_before_anything_is_written(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    started = time.monotonic()
    proc = _run(tmp_path, "run", "spec.yaml", uri=f"http://127.0.0.1:{_free_port()}", timeout=120)
    _clean(proc, 2)
    assert "MLflow tracking server http://127.0.0.1:" in proc.stderr and "does not answer" in proc.stderr
    assert time.monotonic() - started < 60  # imports included; the check itself waits at most 10 s
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_a_wrong_ray_address_fails_in_seconds_before_anything_is_written(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _run(tmp_path, "run", "spec.yaml", "--address", f"127.0.0.1:{_free_port()}", uri=uri, timeout=120)
    _clean(proc, 2)
    assert "no Ray cluster answers at 127.0.0.1:" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


# ---- 3. wrong behaviour -----------------------------------------------------------------------------------
def test_report_uploads_only_the_files_it_wrote_and_says_where_they_went(sweep, tmp_path):
    src, uri = sweep
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not for MLflow\n")
    proc = _run(src, "report", "first", "--out", out, "--format", "csv", uri=uri)
    _clean(proc, 0)
    assert "wrote results.csv and " in proc.stdout and str(out) in proc.stdout
    client = MlflowClient(uri)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("newcomer").experiment_id], "tags.`sweeper.role` = 'parent'"
    )
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/results.csv" in logged and "report/notes.txt" not in logged


def test_report_of_a_sweep_without_a_finished_trial_says_there_is_nothing_yet(tmp_path):
    from sweeper.orchestrate import open_sweep
    from sweeper.spec import load_spec

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**SPEC, "name": "empty"}))
    uri = mlflow_uri(tmp_path)
    # What a run killed before its first trial finished leaves: the sweep directory and its parent run.
    open_sweep(load_spec(tmp_path / "spec.yaml"), tmp_path / "sweeps", uri)
    proc = _run(tmp_path, "report", "empty", uri=uri)
    _clean(proc, 1)
    assert "sweep empty has no finished trial yet" in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "sweeps" / "empty" / "report").exists()


def test_a_resumed_sweeps_progress_counts_what_had_ended_and_its_clock_starts_at_zero():
    """Tune pickles the progress printer with the experiment and unpickles it in the resumed driver, with
    the trials that ended before (in Tune's own restored table)."""
    import io
    from types import SimpleNamespace

    import ray.cloudpickle as cloudpickle

    from sweeper.points import TrialPoint
    from sweeper.progress import ProgressPrinter

    def trial(i, status, epoch):
        point = TrialPoint(trial={}, key=f"k{i}", name=f"seed={i}", cell="all", order=str(i), data_root="/d")
        result = {"epoch": epoch, "test_acc": 0.5} if epoch else {}
        return SimpleNamespace(
            trial_id=f"t{i}", status=status, config={"point": point.to_dict()}, last_result=result
        )

    first = ProgressPrinter(total=6, metric="test_acc", mode="max", epochs=4, stream=io.StringIO())
    pickled = cloudpickle.dumps(first)
    time.sleep(1.1)  # the resumed driver starts later
    resumed = cloudpickle.loads(pickled)
    resumed.stream = io.StringIO()
    trials = [
        trial(0, "TERMINATED", 4),
        trial(1, "TERMINATED", 4),
        trial(2, "PENDING", 2),
        trial(3, "PENDING", 0),
    ]
    resumed.on_step_begin(0, trials)
    resumed.show()
    line = resumed.stream.getvalue().splitlines()[0]
    assert line.startswith("[0s] 2 finished, 0 failed, 0 running, 4 pending"), line
    assert "ETA" not in line  # nothing trained since the resume yet: no rate to go by


# ---- 3 and 4: specs, names and messages -----------------------------------------------------------------
def test_smoke_runs_under_its_own_name_and_set_reaches_search_space_keys(tmp_path):
    from sweeper.spec import load_spec

    spec = ROOT / "search_spaces" / "svsl_search.yaml"
    assert load_spec(spec, smoke=True).spec.name == load_spec(spec).spec.name + "-smoke"
    loaded = load_spec(spec, ["search.space.svsl.alpha={loguniform: [1.0e-6, 1.0e-4]}"])
    assert loaded.spec.search.space["svsl.alpha"].as_spec() == {"loguniform": [1.0e-6, 1.0e-4]}


@pytest.mark.parametrize(
    ("args", "expected", "absent"),
    [
        (["--set", "train.epochs=ten"], "--set train.epochs=ten: train.epochs: ", "spec.yaml: train.epochs"),
        (["--set", "epochs=2"], "epochs: unknown field; did you mean train.epochs?", None),
        (
            ["--set", "train=2"],
            "--set train=2: train: a section: give a mapping of its fields (got 2)",
            "TrainConfig",
        ),
        (["--name", "my sweep"], "name: 1-100 letters, digits, '_', '.' or '-'", "[A-Za-z0-9]"),
        (["--set", "grid.model.mlp.widht=[8]"], "did you mean model.mlp.width", "Value error"),
    ],
)
def test_spec_mistakes_name_their_origin_and_suggest_the_field(tmp_path, args, expected, absent):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    proc = _run(tmp_path, "validate", "spec.yaml", *args, timeout=120)
    _clean(proc, 2)
    assert expected in proc.stderr, proc.stderr
    assert absent is None or absent not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_sweep_name_given_to_run_or_unknown_to_status_says_what_there_is(sweep):
    tmp, uri = sweep
    proc = _run(tmp, "run", "first", uri=uri, timeout=120)
    _clean(proc, 2)
    assert "`sweeper resume first` continues it" in proc.stderr
    proc = _run(tmp, "status", "frist", uri=uri, timeout=120)
    _clean(proc, 2)
    assert "sweeps under sweeps: first" in proc.stderr


def test_help_explains_every_option_and_the_environment(tmp_path):
    for verb in ("run", "resume", "status", "report"):
        text = _run(tmp_path, verb, "--help", timeout=120).stdout
        options = re.findall(r"^  (--[a-z]+)( [A-Z_]+)?\n?\s*(\S*)", text, re.M)
        assert options and all(help_text for _, _, help_text in options), (verb, text)
    top = _run(tmp_path, "--help", timeout=120).stdout
    for var in ("SWEEPER_MAX_TRIALS", "SWEEPER_PROGRESS_SECONDS", "MLFLOW_TRACKING_URI", "SWEEPER_DATA"):
        assert var in top
