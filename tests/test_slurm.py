"""`sweeper slurm` on a real two-node SLURM cluster on this host (tests/slurm_cluster.py): a job whose
trials land on both nodes; a time limit mid-sweep (SLURM's USR1 before it, the job requeues itself and
its second allocation finishes the sweep); a requeue at a random instant without any signal. Each ends
with the exactly-once audit: one FINISHED run per planned trial with epochs 1..E, nothing RUNNING or
FAILED, no Ray process of the job left. The submission checks run without SLURM."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.services import mlflow_uri, wait_for
from tests.slurm_cluster import slurm_cluster, slurm_missing

SPEC = {
    "name": "on-slurm",
    "experiment": "slurm",
    "dataset": "gaussian",
    "data": {"gaussian": {"classes": 3, "dim": 6, "train_per_class": 60, "test_per_class": 20}},
    "model": {"mlp": {"depth": 3, "width": 16}},
    "train": {"epochs": 60, "batch_size": 32},
    "checkpoint": {"every": 20},
    "resources": {"cpu": 1},
    "grid": {"seed": [0, 1, 2, 3]},
}


def _submit(tmp_path, spec: dict, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return subprocess.run(
        [sys.executable, "-m", "sweeper", "slurm", str(path), *flags],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---- submission, no SLURM needed ----------------------------------------------------------------------
def test_a_relative_storage_is_refused_before_anything_is_written(tmp_path):
    done = _submit(tmp_path, SPEC, "--nodes", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--storage sweeps: every node of the job reads and writes the sweep directory" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_a_gpu_spec_without_gpus_and_a_bad_time_are_refused(tmp_path):
    done = _submit(tmp_path, {**SPEC, "resources": {"cpu": 1, "gpu": 1}}, "--storage", str(tmp_path / "s"))
    assert done.returncode == 2 and "resources.gpu is 1.0 but the job asks for no GPU" in done.stderr
    done = _submit(tmp_path, SPEC, "--storage", str(tmp_path / "s"), "--time", "1h")
    assert done.returncode == 2 and "--time 1h: SLURM's forms" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path):
    flags = [
        "--storage",
        str(tmp_path / "sweeps"),
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--time",
        "24:00:00",
    ]
    flags += ["--partition", "gpu", "--sbatch", "--qos=long --mail-type=END", "--dry-run"]
    done = _submit(tmp_path, {**SPEC, "resources": {"cpu": 1, "gpu": 1}}, *flags)
    assert done.returncode == 0, done.stderr
    script = done.stdout
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=24:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --qos=long",
        "#SBATCH --mail-type=END",
        f"#SBATCH --output={tmp_path}/sweeps/on-slurm/slurm/job-%j.out",
        f"exec {sys.executable} -m sweeper.slurm {tmp_path}/sweeps/on-slurm --max-requeues 10 --gpus-per-node 4",
    ]:
        assert line in script.splitlines(), (line, script)
    # Trials on two nodes writing one SQLite file: said before submitting.
    assert "is SQLite: trials on 2 nodes" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


# ---- on a real cluster --------------------------------------------------------------------------------
needs_slurm = pytest.mark.skipif(slurm_missing() is not None, reason=slurm_missing() or "")


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster() as c:
        yield c


def _start(tmp_path, cluster, spec: dict, *flags: str) -> tuple[str, str]:
    uri = mlflow_uri(tmp_path)
    done = _submit(
        tmp_path,
        spec,
        "--storage",
        str(tmp_path / "sweeps"),
        *flags,
        env={**cluster.env, "MLFLOW_TRACKING_URI": uri},
    )
    assert done.returncode == 0, done.stderr
    job = done.stdout.split("submitted SLURM job ")[1].split()[0]
    return job, uri


def _wait_done(cluster, job: str, timeout: float, release: bool = True) -> dict[str, str]:
    """Until the job has ended for good, letting a requeued job start again at once."""
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.job(job)
        state = info.get("JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        if release and state == "PENDING" and info.get("Reason") == "BeginTime":
            cluster.release(job)
        assert time.monotonic() < deadline, f"job {job} not done in {timeout} s: {info}"
        time.sleep(2)


def _retrained(client, run_id: str) -> int:
    """Epochs a trial trained twice: those its run had logged past the epoch it was later restored from
    (a restored trial trains them again without logging them again)."""
    epochs = client.get_metric_history(run_id, "epoch")
    twice = 0
    for restore in client.get_metric_history(run_id, "restored_from_epoch"):
        twice += sum(1 for m in epochs if m.step > restore.value and m.timestamp <= restore.timestamp)
    return twice


def _report(name: str, client, children, info: dict, started: float) -> None:
    """Per scenario, for the closing note (-s): allocations, epochs trained twice, wall time."""
    twice = sum(_retrained(client, c.info.run_id) for c in children)
    print(
        f"\n{name}: {int(info.get('Restarts', 0)) + 1} allocations, {twice} epochs trained twice "
        f"over {len(children)} trials, {time.monotonic() - started:.0f} s from submission to the end"
    )


def _audit(tmp_path, uri: str, spec: dict, job: str | None = None) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(spec["experiment"])
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status) for r in runs]
    children = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
    keys = [r.data.tags["sweeper.trial_key"] for r in children]
    assert len(keys) == len(set(keys)) == len(spec["grid"]["seed"])
    for child in children:
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "test_acc"))
        assert steps == list(range(1, spec["train"]["epochs"] + 1)), child.info.run_name
    # No Ray process of the job is left on the "nodes" (this host): each runs with the job's temp dir.
    if job is not None:
        mark = f"/tmp/sw{job}n"
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if mark in " ".join(p.info["cmdline"] or [])]
        assert wait_for(lambda: not [p for p in left if psutil.pid_exists(p)], timeout=60), left
    return children


def _output(tmp_path) -> str:
    return "".join(
        p.read_text() for p in sorted((tmp_path / "sweeps" / "on-slurm" / "slurm").glob("job-*.out"))
    )


@needs_slurm
@pytest.mark.slow
def test_the_time_limit_stops_the_sweep_which_requeues_and_finishes_in_its_next_allocation(tmp_path, cluster):
    # About 70 s of training per node (two 1-CPU nodes); the limit is 2 minutes, USR1 60 s before it,
    # and Ray's start takes ~15 s of each allocation: two or three allocations.
    spec = {**SPEC, "train": {"epochs": 1000, "batch_size": 32}, "checkpoint": {"every": 400}}
    started = time.monotonic()
    job, uri = _start(tmp_path, cluster, spec, "--nodes", "2", "--time", "00:02:00", "--signal-lead", "60")
    info = _wait_done(cluster, job, timeout=600)
    out = _output(tmp_path)
    assert info["JobState"] == "COMPLETED", out[-3000:]
    assert int(info["Restarts"]) >= 1 and "SIGUSR1: stopping" in out and "requeueing job" in out, out[-3000:]
    assert "2 of 2 nodes" in out
    children = _audit(tmp_path, uri, spec, job)
    # Where each trial ran last (a Ray node id is new in every allocation): more than one node.
    assert len({c.data.tags["sweeper.node"] for c in children}) >= 2
    client = MlflowClient(uri)
    restored = {}
    for child in children:
        # A trial stopped by the signal continued from the epoch it was in: nothing trained twice.
        restored[child.info.run_name] = [
            int(m.value) for m in client.get_metric_history(child.info.run_id, "restored_from_epoch")
        ]
        assert all(r % 400 for r in restored[child.info.run_name]), restored  # not a regular checkpoint
    _report("time limit", client, children, info, started)
    # The goal: at most one epoch trained twice per trial running at the signal (here: none).
    assert sum(_retrained(client, c.info.run_id) for c in children) <= len(children)
    status = subprocess.run(
        [sys.executable, "-m", "sweeper", "status", "on-slurm", "--storage", str(tmp_path / "sweeps"), "--json"],
        env={**cluster.env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    slurm = json.loads(status.stdout)["slurm"]
    assert (
        slurm["job"] == job and slurm["state"] == "COMPLETED" and slurm["requeues"] == int(info["Restarts"])
    )
    ended = [a["ended"] for a in slurm["allocations"]]
    assert ended == ["stopped (SIGUSR1)"] * (len(ended) - 1) + ["finished"], ended
    assert all(a["nodes"] == ["n1", "n2"] for a in slurm["allocations"])


@needs_slurm
@pytest.mark.slow
def test_a_requeue_at_a_random_instant_loses_and_repeats_nothing(tmp_path, cluster):
    spec = {**SPEC, "train": {"epochs": 600, "batch_size": 32}, "checkpoint": {"every": 25}}
    started = time.monotonic()
    job, uri = _start(tmp_path, cluster, spec, "--nodes", "2")
    assert wait_for(lambda: cluster.job(job).get("JobState") == "RUNNING", timeout=120)
    time.sleep(random.uniform(10, 35))
    cluster.run("scontrol", "requeue", job)
    info = _wait_done(cluster, job, timeout=600)
    assert info["JobState"] == "COMPLETED", _output(tmp_path)[-3000:]
    assert int(info["Restarts"]) >= 1
    children = _audit(tmp_path, uri, spec, job)
    _report("scontrol requeue", MlflowClient(uri), children, info, started)


@needs_slurm
@pytest.mark.slow
def test_two_sweeps_jobs_on_the_same_two_nodes_at_once_never_meet(tmp_path, cluster):
    """Each job's Ray has its own ports and temp dirs, and ending one job's Ray leaves the other's running."""
    specs = [
        {**SPEC, "name": f"twin-{i}", "experiment": f"twin-{i}", "train": {"epochs": 400, "batch_size": 32}}
        for i in (0, 1)
    ]
    uri = mlflow_uri(tmp_path)
    jobs = []
    for spec in specs:
        path = tmp_path / f"{spec['name']}.yaml"
        path.write_text(yaml.safe_dump(spec))
        done = subprocess.run(
            [sys.executable, "-m", "sweeper", "slurm", str(path), "--nodes", "2", "--storage", str(tmp_path / "sweeps")],
            cwd=tmp_path, env={**cluster.env, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        jobs.append(done.stdout.split("submitted SLURM job ")[1].split()[0])
    both = wait_for(lambda: all(cluster.job(j).get("JobState") == "RUNNING" for j in jobs), timeout=120)
    assert both, [cluster.job(j) for j in jobs]
    for job in jobs:
        assert _wait_done(cluster, job, timeout=400)["JobState"] == "COMPLETED"
    addresses = set()
    for spec, job in zip(specs, jobs):
        out = "".join(p.read_text() for p in (tmp_path / "sweeps" / spec["name"] / "slurm").glob("job-*.out"))
        assert "2 of 2 nodes" in out and "sweep ended, 4 finished, 0 failed" in out, out[-3000:]
        addresses.add(out.split("Ray cluster at ")[1].split(",")[0])
        _audit(tmp_path, uri, spec, job)
    assert len(addresses) == 2, addresses


@needs_slurm
@pytest.mark.slow
def test_a_preempted_job_resumes_in_its_next_allocation_with_nothing_lost(tmp_path, cluster):
    """A job of the high partition (PriorityTier 10) takes both nodes: SLURM requeues the sweep's job with a
    SIGTERM (PreemptMode=REQUEUE), which stops the sweep as the time limit's signal does."""
    spec = {**SPEC, "train": {"epochs": 600, "batch_size": 32}, "checkpoint": {"every": 200}}
    started = time.monotonic()
    job, uri = _start(tmp_path, cluster, spec, "--nodes", "2")
    client = MlflowClient(uri)

    def training() -> bool:
        exp = client.get_experiment_by_name("slurm")
        runs = client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'trial'") if exp else []
        return any(r.data.metrics.get("epoch", 0) >= 30 for r in runs)

    assert wait_for(training, timeout=180), _output(tmp_path)[-3000:]
    high = cluster.run(
        "sbatch", "--parsable", "--partition=high", "--nodes=2", "--exclusive", "--wrap", "sleep 15"
    ).strip()
    info = _wait_done(cluster, job, timeout=600)
    out = _output(tmp_path)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, out[-3000:]
    assert "SIGTERM: stopping" in out, out[-3000:]
    assert cluster.job(high).get("JobState") == "COMPLETED"
    _report("preemption", client, _audit(tmp_path, uri, spec, job), info, started)


@needs_slurm
@pytest.mark.slow
def test_a_job_that_loses_a_node_goes_on_and_finishes_on_the_other(tmp_path, cluster):
    """Submitted with --no-kill: n2 set down mid-sweep ends its srun step and Ray node; the trials that ran
    there fail over (Tune's retries, max_failures) and continue from their checkpoints on n1."""
    spec = {
        **SPEC,
        "train": {"epochs": 300, "batch_size": 32},
        "checkpoint": {"every": 10},
        "max_failures": 3,
    }
    started = time.monotonic()
    job, uri = _start(tmp_path, cluster, spec, "--nodes", "2", "--no-kill")
    client = MlflowClient(uri)

    def on_both() -> bool:
        exp = client.get_experiment_by_name("slurm")
        runs = client.search_runs([exp.experiment_id], "tags.`sweeper.role` = 'trial'") if exp else []
        return len([r for r in runs if r.data.metrics.get("epoch", 0) >= 20]) >= 2

    try:
        assert wait_for(on_both, timeout=180), _output(tmp_path)[-3000:]
        cluster.run("scontrol", "update", "nodename=n2", "state=down", "reason=sweeper-test")
        info = _wait_done(cluster, job, timeout=600)
    finally:
        cluster.run("scontrol", "update", "nodename=n2", "state=resume", check=False)
    out = _output(tmp_path)
    assert info["JobState"] == "COMPLETED" and "sweep ended, 4 finished, 0 failed" in out, out[-3000:]
    children = _audit(tmp_path, uri, spec, job)
    # At least one trial ran on the lost node and continued from its checkpoint elsewhere.
    restored = [
        m.value for c in children for m in client.get_metric_history(c.info.run_id, "restored_from_epoch")
    ]
    assert restored, out[-3000:]
    _report("node lost", client, children, info, started)


@needs_slurm
@pytest.mark.slow
def test_a_searched_sweep_requeued_twice_runs_each_cells_budget_exactly_once(tmp_path, cluster):
    """Grid x Optuna: `scontrol requeue` twice mid-search (SLURM's SIGTERM to the job, then a new
    allocation each time); every study ends with exactly its budget of trials, each one MLflow run."""
    from tests.test_search import _check_exact_budget

    spec = {
        **SPEC,
        "train": {"epochs": 300, "batch_size": 32},
        "checkpoint": {"every": 50},
        "grid": {"etf": [{"depth": 0}, {"depth": 1}]},
        "search": {
            "optuna": {"sampler": "tpe", "trials_per_cell": 3, "max_concurrent": 2, "seed": 0},
            "space": {"svsl.alpha": {"loguniform": [5.0e-8, 5.0e-5]}, "svsl.gamma": {"int": [1, 2]}},
        },
    }
    started = time.monotonic()
    job, uri = _start(tmp_path, cluster, spec, "--nodes", "2")
    for allocation in (1, 2):
        assert wait_for(lambda: cluster.job(job).get("JobState") == "RUNNING", timeout=240)
        assert wait_for(lambda n=allocation: f"allocation {n}, nodes" in _output(tmp_path), timeout=60)
        time.sleep(random.uniform(20, 30))
        cluster.run("scontrol", "requeue", job)
        assert wait_for(lambda: cluster.job(job).get("JobState") == "PENDING", timeout=120)
        cluster.release(job)
    info = _wait_done(cluster, job, timeout=600)
    out = _output(tmp_path)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 2, out[-3000:]
    optuna_db = tmp_path / "sweeps" / "on-slurm" / "optuna.db"
    _check_exact_budget(f"sqlite:///{optuna_db}", uri, cells=2, budget=3, experiment="slurm")
    client = MlflowClient(uri)
    children = client.search_runs(
        [client.get_experiment_by_name("slurm").experiment_id], "tags.`sweeper.role` = 'trial'"
    )
    _report("searched, requeued twice", client, children, info, started)
