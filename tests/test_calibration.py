"""``auto`` settings chosen by measurement (sweeper.calibration, trainables.calibrate).

The choices are tested with timers whose timings the test sets (bundling slower, bundling faster, ties,
concurrency, GPU packing, timings that cannot pay off), the caching and the resume rule with a timer that
counts its calls, and the real timer on a real launch-bound model; a short real sweep with ``bundle: auto``
skips the timings that cannot pay off and says so on its parent run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeper import calibration
from sweeper.location import parse_location
from sweeper.orchestrate import members_per_trial, run_sweep, trial_slots
from sweeper.spec import expand, load_spec
from tests.services import mlflow_uri
from trainables.calibrate import TIE, StepTimer, choose

BASE = {
    "name": "cal",
    "dataset": "gaussian",
    "data": {"gaussian": {"classes": 3, "dim": 4, "train_per_class": 300, "test_per_class": 10}},
    "model": {"mlp": {"depth": 2, "width": 4, "batchnorm": False}},
    "train": {"epochs": 300, "batch_size": 4},
    "grid": {"seed": list(range(16))},
}
"""16 trials of 300 epochs of 225 steps: a sweep long enough that timing pays off (at 1 ms per step, 9
minutes of node time against ~11 s of timing)."""
SHORT = BASE | {
    "data": {"gaussian": {"classes": 3, "dim": 4, "train_per_class": 30, "test_per_class": 10}},
    "train": {"epochs": 1, "batch_size": 4},
}
"""The same trials for one epoch of 22 steps: the short sweep a user starts with."""


class SetTimers:
    """Timings the test decides: ``per_step(members, together, cpu, gpu)`` is the seconds of one step of
    one slot (``members`` trials stacked); the calibration gets per-trial seconds on the node from it."""

    def __init__(self, per_step, device="Test CPU", torch_version="9.9", gpu_memory=0, cost_s=0.0):
        self.per_step = per_step
        self.cost_s = cost_s  # the wall time one measurement takes
        self.calls: list[tuple[int, int, float, float]] = []
        self.estimates = 0
        self.info = {"device": device, "torch": torch_version, "gpu_memory": gpu_memory, "memory": 64 << 30}

    def identity(self, gpu):
        return dict(self.info)

    def time(self, cfg, members, together, cpu, gpu):
        self.calls.append((members, together, cpu, gpu))
        time.sleep(self.cost_s)
        return self.per_step(members, together, cpu, gpu) / members / together

    def estimate(self, cfg, threads):
        self.estimates += 1
        return self.per_step(1, 1, threads, 0.0), self.cost_s

    def close(self):
        pass


def resolve(tmp_path: Path, spec: dict, timers, nodes=({"CPU": 2},), sweep="s1"):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = load_spec(path)
    trials = expand(loaded)
    storage = parse_location(tmp_path / "sweeps")
    sweep_dir = storage.child(sweep)
    sweep_dir.write_text("marker", "")  # the sweep directory exists before calibration (as in run_sweep)
    return calibration.resolve(
        loaded,
        trials,
        sweep_dir,
        storage,
        representative=trials[0].config,
        bundle_cap=lambda spec, total: members_per_trial(spec, trials, trial_slots(spec, total)),
        nodes=list(nodes),
        timers=timers,
    )


def test_choose_takes_the_fastest_and_gives_ties_to_the_smaller():
    assert choose({1: 1.0, 2: 1.6, 4: 1.2}) == 1  # bundling slower
    assert choose({1: 1.0, 2: 0.7, 4: 0.4}) == 4  # bundling faster
    assert choose({1: 1.0, 2: 1 - TIE / 2}) == 1  # within the tie margin
    assert choose({1: 1.0, 2: 0.5, 4: 0.49}) == 2  # 4 is not 5% faster than 2


def test_bundling_slower_picks_1(tmp_path):
    # A bundle's step costs 1.3x per member what a lone trial's does (2-core AMD EPYC: 1.59x for 4).
    timers = SetTimers(lambda b, k, cpu, gpu: 1e-3 * (1 if b == 1 else 1.3 * b))
    loaded, record = resolve(tmp_path, BASE | {"bundle": "auto", "resources": {"cpu": 1}}, timers)
    assert record["bundle"] == 1 and loaded.spec.bundle == 1
    # 16 trials on 2 one-CPU slots: auto allowed up to 8 per bundle; every size was timed, both slots busy.
    assert [c[0] for c in timers.calls] == [1, 2, 4, 8] and {c[1] for c in timers.calls} == {2}
    # Node-wide: two slots side by side halve the time per trial step.
    assert "bundle 1 (1: 0.5 ms <-, 2: 0.65 ms, 4: 0.65 ms, 8: 0.65 ms)" in record["reason"]


def test_bundling_faster_picks_the_fastest_size(tmp_path):
    timers = SetTimers(lambda b, k, cpu, gpu: 1e-3 * (1 + 0.1 * b))  # launch-bound: b trials for ~1 step
    loaded, record = resolve(tmp_path, BASE | {"bundle": "auto", "resources": {"cpu": 1}}, timers)
    assert record["bundle"] == 8 and loaded.spec.bundle == 8
    assert set(record["timings_s_per_trial_step"]["bundle"]) == {"1", "2", "4", "8"}


def test_bundle_sizes_are_timed_only_when_that_can_pay_off(tmp_path):
    """SHORT: 16 trials of 22 steps at 0.55 ms of node time each, ~0.2 s of training, against ~11 s to
    start the timers and time 4 sizes: bundle 1, decided before any timer starts. BASE (300 epochs of 225
    steps, ~10 minutes): every size is timed and bundling wins."""
    launch_bound = lambda b, k, cpu, gpu: 1e-3 * (1 + 0.1 * b)  # noqa: E731 (bundling would win)
    short = SetTimers(launch_bound, cost_s=0.1)
    loaded, record = resolve(tmp_path, SHORT | {"bundle": "auto", "resources": {"cpu": 1}}, short, sweep="a")
    assert loaded.spec.bundle == 1 and record["bundle"] == 1
    assert short.calls == [] and short.estimates == 1  # no timer actor was needed
    assert (
        "bundle 1 (not timed: 4 size(s) would take ~11.4 s, over 5% of the sweep's ~0 s" in record["reason"]
    )
    assert f"measuring took {record['measuring_s']:g} s" in record["reason"]
    long = SetTimers(launch_bound, cost_s=0.1, device="Other CPU")
    loaded, record = resolve(tmp_path, BASE | {"bundle": "auto", "resources": {"cpu": 1}}, long, sweep="b")
    assert loaded.spec.bundle == 8 and [c[0] for c in long.calls] == [1, 2, 4, 8]
    assert "measuring took" in record["reason"]


def test_with_other_settings_timed_too_bundle_1s_timing_decides_whether_the_rest_pay_off(tmp_path):
    """resources.cpu: auto starts the timers anyway: bundle 1 is timed, and its 0.1 s per size against
    ~0.2 s of training stops there."""
    timers = SetTimers(lambda b, k, cpu, gpu: 1e-3 * (1 + 0.1 * b), cost_s=0.1)
    loaded, record = resolve(tmp_path, SHORT | {"bundle": "auto", "resources": {"cpu": "auto"}}, timers)
    assert loaded.spec.bundle == 1 and timers.estimates == 0
    assert [c[0] for c in timers.calls if c[0] > 1] == []  # only members=1: concurrency and bundle 1
    assert record["timings_s_per_trial_step"]["bundle"].keys() == {"1"}
    assert "bundle 1 (not timed: 3 size(s) would take ~0.3 s" in record["reason"]


def test_explicit_bundle_is_kept_and_only_concurrency_is_timed(tmp_path):
    timers = SetTimers(lambda b, k, cpu, gpu: 1e-3 * (1 + 0.1 * b))
    loaded, record = resolve(tmp_path, BASE | {"bundle": 2, "resources": {"cpu": "auto"}}, timers)
    assert loaded.spec.bundle == 2 and record["bundle"] == 2
    assert all(c[0] == 1 for c in timers.calls)  # no bundle size was timed


def test_concurrency_two_one_thread_trials_or_one_two_thread_trial(tmp_path):
    # Side by side each slot runs at full speed (two 1-thread trials per node): choose 1 CPU per trial.
    side_by_side = SetTimers(lambda b, k, cpu, gpu: 1e-3)
    loaded, record = resolve(tmp_path, BASE | {"resources": {"cpu": "auto"}}, side_by_side, sweep="a")
    assert loaded.spec.resources.cpu == 1 and side_by_side.calls == [(1, 1, 2.0, 0.0), (1, 2, 1.0, 0.0)]
    # Two threads halve the step and two trials contend: one 2-thread trial per node.
    threads_pay = SetTimers(lambda b, k, cpu, gpu: 1e-3 / cpu * k, device="Other CPU")
    loaded, record = resolve(tmp_path, BASE | {"resources": {"cpu": "auto"}}, threads_pay, sweep="b")
    assert loaded.spec.resources.cpu == 2
    assert "1 trials per node" in record["reason"]


def test_gpu_auto_without_a_gpu_runs_on_cpus_with_a_notice(tmp_path):
    timers = SetTimers(lambda b, k, cpu, gpu: 1e-3)
    loaded, record = resolve(tmp_path, BASE | {"resources": {"cpu": 1, "gpu": "auto"}}, timers)
    assert loaded.spec.resources.gpu == 0 and loaded.spec.resources.cpu == 1
    assert record["reason"] == "resources.gpu: auto found no GPU in the cluster; trials run on CPUs"
    assert timers.calls == []  # nothing else was auto: nothing timed


def test_gpu_auto_packs_the_trials_per_gpu_that_train_fastest(tmp_path):
    # 4 trials share a GPU at nearly full speed each; 8 contend.
    timers = SetTimers(lambda b, k, cpu, gpu: 1e-3 * max(1, k / 4), device="Test GPU", gpu_memory=80 << 30)
    spec = BASE | {"resources": {"cpu": "auto", "gpu": "auto"}}
    loaded, record = resolve(tmp_path, spec, timers, nodes=[{"CPU": 16, "GPU": 1}])
    assert loaded.spec.resources.gpu == 0.25 and loaded.spec.resources.cpu == 4
    assert set(record["timings_s_per_trial_step"]["trials_per_gpu"]) == {"1", "2", "4", "8", "16"}


def test_timings_are_cached_per_device_and_torch_and_a_sweep_keeps_its_choice(tmp_path):
    spec = BASE | {"bundle": "auto", "resources": {"cpu": 1}}
    first = SetTimers(lambda b, k, cpu, gpu: 1e-3 * (1 + 0.1 * b))
    _, record = resolve(tmp_path, spec, first, sweep="s1")
    assert record["bundle"] == 8 and first.calls
    # A second sweep of the same model on the same device and torch: no measuring.
    second = SetTimers(lambda b, k, cpu, gpu: 1e-3)
    _, again = resolve(tmp_path, spec, second, sweep="s2")
    assert second.calls == [] and again["bundle"] == 8 and again["reason"].endswith("(cached)")
    # Another torch version is another measurement, and bundling no longer pays there.
    third = SetTimers(lambda b, k, cpu, gpu: 1e-3 * b, torch_version="10.0")
    _, other = resolve(tmp_path, spec, third, sweep="s3")
    assert third.calls and other["bundle"] == 1
    # Resuming s1 keeps what it started with, whatever the cache says now.
    fourth = SetTimers(lambda b, k, cpu, gpu: 1e-3 * b)
    loaded, resumed = resolve(tmp_path, spec, fourth, sweep="s1")
    assert fourth.calls == [] and loaded.spec.bundle == 8
    frozen = json.loads((tmp_path / "sweeps" / "s1" / "calibration.json").read_text())
    assert frozen["bundle"] == 8 and frozen["timings_s_per_trial_step"]["bundle"]["1"] > 0


class InProcessTimers(SetTimers):
    """The real StepTimer, here in the test's process (one slot)."""

    def __init__(self):
        super().__init__(None)
        self.info["device"] = "this CPU (in process)"

    def time(self, cfg, members, together, cpu, gpu):
        assert together == 1
        self.calls.append((members, together, cpu, gpu))
        return StepTimer(cfg, members, threads=1).time(0.3)

    def estimate(self, cfg, threads):
        self.estimates += 1
        return calibration.RayTimers().estimate(cfg, threads)  # the real one: in this process


def test_a_launch_bound_model_is_bundled_by_its_real_timings(tmp_path):
    """A 4-wide MLP on batches of 4 costs a lone trial Python and launches per step, which a bundle
    shares: measured 350 vs 145 us per trial step for 1 vs 8 (2.4x) on 2-core Xeon and EPYC machines."""
    timers = InProcessTimers()
    # An hour of training at bundle 1 (9,000 samples): worth the timings (BASE's 2 minutes of this toy
    # model are not: ~14 s of timing is more than 5% of them).
    spec = BASE | {"bundle": "auto", "resources": {"cpu": 1}}
    spec["data"] = {"gaussian": {"classes": 3, "dim": 4, "train_per_class": 3000, "test_per_class": 10}}
    loaded, record = resolve(tmp_path, spec, timers, nodes=[{"CPU": 1}])
    timings = record["timings_s_per_trial_step"]["bundle"]
    assert set(timings) == {"1", "2", "4", "8", "16"}
    assert loaded.spec.bundle > 1 and timings[str(loaded.spec.bundle)] < timings["1"] * (1 - TIE)


@pytest.mark.slow
def test_a_short_sweep_with_auto_skips_timing_that_cannot_pay_off_and_says_why(tmp_path, local_ray):
    """The short sweep a user starts with: the driver times one trial's step in its own process, finds that
    timing bundle sizes on the real Ray timers cannot pay off, starts none, and the parent run says why
    and how long it took."""
    spec = {
        "name": "cal-sweep",
        "experiment": "cal-sweep",
        "dataset": "digits",
        "model": {"mlp": {"preset": "seed000"}},
        "train": {"epochs": 1, "batch_size": 128},
        "metrics": {"max_samples": 300},
        "grid": {"seed": [0, 1, 2, 3]},
        "bundle": "auto",
        "resources": {"cpu": 1, "gpu": "auto"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    uri = mlflow_uri(tmp_path)
    result = run_sweep(
        load_spec(path), storage=tmp_path / "sweeps", address=None, tracking_uri=uri, progress=False
    )
    assert [o.status for o in result.outcomes] == ["FINISHED"] * 4
    sweep_dir = tmp_path / "sweeps" / "cal-sweep"
    record = json.loads((sweep_dir / "calibration.json").read_text())
    # 4 trials on the fixture's 2 one-CPU slots allow bundles of 2: not worth starting timers for.
    assert record["bundle"] == 1 and set(record["timings_s_per_trial_step"]) == {"estimate"}
    assert "bundle 1 (not timed: 2 size(s)" in record["reason"] and "no GPU" in record["reason"]
    assert f"measuring took {record['measuring_s']:g} s" in record["reason"]
    files = sorted(p.name for p in (sweep_dir / "checkpoints").iterdir())
    assert len(files) == 4 and not any(f.startswith("bundle-") for f in files)  # one Tune trial each
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["sweeper.calibration"] == record["reason"]
    logged = json.loads(Path(client.download_artifacts(result.parent_run_id, "calibration.json")).read_text())
    assert logged["timings_s_per_trial_step"] == record["timings_s_per_trial_step"]


def test_the_headline_spec_is_not_refused_on_a_machine_without_a_gpu():
    import torch

    from sweeper.orchestrate import check_resources

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    loaded = load_spec(Path(__file__).parent.parent / "search_spaces" / "etf_depth.yaml")
    assert loaded.spec.resources.gpu == "auto"
    check_resources(loaded, expand(loaded), None)  # gpu: auto runs on CPUs (an explicit number is refused)
