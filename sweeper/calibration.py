"""The settings a spec leaves to ``auto`` (``bundle``, ``resources.cpu``, ``resources.gpu``), chosen by
timing the trials' own training step on a node that will run them (trainables.calibrate).

In order, each at the previous step's choice:

1. ``resources.gpu: auto``: without a GPU in the cluster, trials run on CPUs (one notice line). With one,
   the trials per GPU (1, 2, 4, ... whose memory estimate fits the GPU, trainables.memory) that train
   the most trial steps per second on it.
2. ``resources.cpu: auto``: the trials per CPU node (1, 2, 4, ... up to one per core), each with an equal
   share of the node's cores as torch threads, timed running side by side; on GPU trials, the node's
   cores shared out over its trial slots.
3. ``bundle: auto``: the bundle size (1, 2, 4, ... up to what fills the trial slots once) with the
   lowest time per trial step, every slot of the node busy.

A larger setting wins only when it is more than 5% faster (trainables.calibrate.TIE), so a tie goes to 1.
Bundle sizes are timed only when that can pay off: if timing them would cost more than :data:`PAYOFF` of
the sweep's estimated training time, ``auto`` is 1 and the notice says why (a 10-epoch sweep of seed
000's MLP took 71.7 s with ``auto`` against 61.4 s with 1, all of it measuring). When ``bundle`` is the
only setting to time, that is judged before any timer actor starts, from a short timing of one trial's
step in the driver's process (:meth:`Timers.estimate`); otherwise from bundle 1's own timing.
The choice is frozen in the sweep directory (``calibration.json``) on first run, so a resumed sweep keeps
the Tune trial layout it started with; timings are also cached in the storage (``calibration-cache.json``)
by model, input shape, batch size, device, torch version and candidates, so a second sweep of the same
model on the same machine does not measure again. The parent run gets the choice and its timings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from sweeper.location import Location
from sweeper.spec import LoadedSpec, PlannedTrial
from trainables.calibrate import TIE, choose
from trainables.config import TrialConfig

CALIBRATION_FILE = "calibration.json"
CACHE_FILE = "calibration-cache.json"
WINDOW_S = 1.5
"""Seconds each setting is timed for (several hundred steps of a small model)."""
GPU_MEMORY_USE = 0.9
"""Share of a GPU's memory the trials packed on it may be estimated to need."""
PAYOFF = TIE
ACTOR_START_S = 5.0
"""What starting the timer actors costs before the first timing (they import torch): 8.3 s went to start,
identity and one WINDOW_S timing on this project's 2-core machine."""
ESTIMATE_S = 0.2
"""Seconds of the in-process timing that estimates a sweep's training time (:meth:`Timers.estimate`)."""
"""Largest share of the sweep's estimated training time that timing bundle sizes may cost: a size wins
only when it is TIE faster, so timings that cost more than that are not sure to pay for themselves."""


def auto_fields(loaded: LoadedSpec) -> list[str]:
    spec = loaded.spec
    fields = {"bundle": spec.bundle, "resources.cpu": spec.resources.cpu, "resources.gpu": spec.resources.gpu}
    return [name for name, value in fields.items() if value == "auto"]


def apply(loaded: LoadedSpec, record: dict[str, Any]) -> LoadedSpec:
    """The spec with its ``auto`` settings replaced by the numbers ``record`` chose (the frozen spec and its
    hash keep ``auto``: they are what the user wrote)."""
    spec = loaded.spec
    resources = spec.resources.model_copy(update={"cpu": record["cpu"], "gpu": record["gpu"]})
    update: dict[str, Any] = {"resources": resources}
    if spec.bundle == "auto":
        update["bundle"] = record["bundle"]
    return dataclasses.replace(loaded, spec=spec.model_copy(update=update))


BundleCap = Callable[[LoadedSpec, dict[str, float]], int]
"""The largest bundle a spec (with numeric resources, ``bundle: auto``) allows on a cluster of the given
total resources: one bundle per trial slot (sweeper.orchestrate.members_per_trial)."""


class Timers(Protocol):
    """What the calibration measures with: :class:`RayTimers`, or in tests a timer they control."""

    def identity(self, gpu: bool) -> dict[str, Any]:
        """Of the device a trial runs on (a GPU when ``gpu``): ``device`` (name), ``torch`` (version),
        ``gpu_memory`` (bytes, 0 without a GPU) and ``memory`` (the node's, bytes)."""

    def time(self, cfg: TrialConfig, members: int, together: int, cpu: float, gpu: float) -> float:
        """Seconds per trial step on one node with ``together`` trial slots busy side by side, each
        training ``members`` trials of ``cfg`` stacked, with ``cpu`` cores and ``gpu`` of a GPU apiece."""

    def estimate(self, cfg: TrialConfig, threads: int) -> tuple[float, float]:
        """Seconds per training step of one lone trial of ``cfg`` with ``threads`` torch threads, and the
        seconds it took to prepare and time it: a quick figure, before any timer runs on a node."""

    def close(self) -> None: ...


def resolve(
    loaded: LoadedSpec,
    trials: list[PlannedTrial],
    sweep_dir: Location,
    storage: Location,
    *,
    representative: TrialConfig,
    bundle_cap: BundleCap,
    nodes: list[dict[str, float]] | None = None,
    timers: Timers | None = None,
) -> tuple[LoadedSpec, dict[str, Any] | None]:
    """The spec with numbers for its ``auto`` settings, and the record of how they were chosen (None when
    nothing is ``auto``). ``representative``: the trial whose model is timed (the first of the largest
    bundle group: the model most of the sweep's compute goes to). ``nodes`` (each node's resources) and
    ``timers`` default to the Ray session's."""
    if not auto_fields(loaded):
        return loaded, None
    if sweep_dir.exists(CALIBRATION_FILE):
        record = json.loads(sweep_dir.read_text(CALIBRATION_FILE))
        print(f"calibration (when the sweep started): {record['reason']}", file=sys.stderr)
        return apply(loaded, record), record
    if nodes is None:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    timers = timers if timers is not None else RayTimers()
    try:
        record = Calibrator(loaded, trials, storage, representative, bundle_cap, nodes, timers).run()
    finally:
        timers.close()
    sweep_dir.write_text(CALIBRATION_FILE, json.dumps(record, indent=2))
    print(f"calibration: {record['reason']}", file=sys.stderr)
    return apply(loaded, record), record


class Calibrator:
    """The choices, in the order of the module docstring, from what ``timers`` measure."""

    def __init__(
        self,
        loaded: LoadedSpec,
        trials: list[PlannedTrial],
        storage: Location,
        representative: TrialConfig,
        bundle_cap: BundleCap,
        nodes: list[dict[str, float]],
        timers: Timers,
    ) -> None:
        self.loaded = loaded
        self.trials = trials
        self.storage = storage
        self.spec = loaded.spec
        self.timers = timers
        self.notices: list[str] = []
        gpu = self.spec.resources.gpu
        if gpu == "auto" and not any(r.get("GPU", 0) for r in nodes):
            gpu = 0.0
            self.notices.append("resources.gpu: auto found no GPU in the cluster; trials run on CPUs")
        self.gpu_setting = gpu
        self.on_gpu = gpu != 0
        trial_nodes = [r for r in nodes if r.get("CPU", 0) >= 1 and (not self.on_gpu or r.get("GPU", 0) > 0)]
        # A heterogeneous cluster is timed on its smallest node: a setting that fits it fits them all.
        self.node_cpus = int(min(r["CPU"] for r in trial_nodes))
        self.node_gpus = int(min(r.get("GPU", 0) for r in trial_nodes)) if self.on_gpu else 0
        self.nodes = len(trial_nodes)
        self.cfg = representative
        self.bundle_cap = bundle_cap
        self.timings: dict[str, dict[str, float]] = {}
        self.skipped: tuple[int, float, float] | None = None
        """Bundle sizes not timed because they could not pay off: (sizes, their estimated cost in s, the
        sweep's estimated training time in s)."""

    # ---- the steps ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        spec_cpu = self.spec.resources.cpu
        if not (
            self.spec.bundle == "auto" or (self.on_gpu and self.gpu_setting == "auto") or spec_cpu == "auto"
        ):
            # Only `resources.gpu: auto` on a cluster without GPUs: nothing to time.
            cpu = 1.0 if spec_cpu == "auto" else spec_cpu
            return {"bundle": self.spec.bundle, "cpu": cpu, "gpu": 0.0, "reason": "; ".join(self.notices)}
        started = time.perf_counter()
        if self._bundle_only_and_short():
            cpu = self.spec.resources.cpu
            gpu = 0.0 if self.gpu_setting == "auto" else self.gpu_setting
            measuring_s = round(time.perf_counter() - started, 1)
            reason = self._reason(1, cpu, gpu, "the driver's process") + f"; measuring took {measuring_s:g} s"
            return {
                "bundle": 1,
                "cpu": cpu,
                "gpu": gpu,
                "timings_s_per_trial_step": self.timings,
                "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "measuring_s": measuring_s,
                "reason": "; ".join(self.notices + [reason]),
            }
        identity = self.timers.identity(self.on_gpu)
        key = self._cache_key(identity)
        cache = _read_cache(self.storage)
        if key in cache:
            return dict(cache[key], reason="; ".join(self.notices + [cache[key]["reason"] + " (cached)"]))
        per_gpu, cpu = self._concurrency(identity)
        bundle = self._bundle(per_gpu, cpu, identity) if self.spec.bundle == "auto" else self.spec.bundle
        gpu = (1 / per_gpu if per_gpu else 0.0) if self.gpu_setting == "auto" else self.gpu_setting
        measuring_s = round(time.perf_counter() - started, 1)
        record = {
            "bundle": bundle,
            "cpu": cpu,
            "gpu": gpu,
            "device": identity["device"],
            "torch": identity["torch"],
            "node_cpus": self.node_cpus,
            "timings_s_per_trial_step": self.timings,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "measuring_s": measuring_s,
            "reason": self._reason(bundle, cpu, gpu, identity["device"])
            + f"; measuring took {measuring_s:g} s",
        }
        cache[key] = record
        _write_cache(self.storage, cache)
        return dict(record, reason="; ".join(self.notices + [record["reason"]]))

    def _concurrency(self, identity: dict[str, Any]) -> tuple[int, float]:
        """Trials per GPU (0 on CPUs) and CPUs per trial."""
        spec_cpu = self.spec.resources.cpu
        if not self.on_gpu:
            if spec_cpu != "auto":
                return 0, spec_cpu
            shares = {k: self.node_cpus / k for k in _doublings(self.node_cpus)}
            seconds = {k: self.timers.time(self.cfg, 1, k, share, 0.0) for k, share in shares.items()}
            self.timings["trials_per_node"] = {str(k): s for k, s in seconds.items()}
            return 0, shares[choose(seconds)]
        if self.gpu_setting != "auto":
            per_gpu = max(1, int(1 / self.gpu_setting)) if self.gpu_setting < 1 else 1
        else:
            from trainables.memory import estimate_bytes

            need = estimate_bytes(self.cfg, 1)
            fits = max(1, int(GPU_MEMORY_USE * identity["gpu_memory"] // need))
            wanted = math.ceil(len(self.trials) / max(1, self.nodes * self.node_gpus))
            candidates = _doublings(min(fits, wanted, self.node_cpus))
            seconds = {
                k: self.timers.time(self.cfg, 1, k, self._gpu_cpu(k, spec_cpu), 1 / k) for k in candidates
            }
            self.timings["trials_per_gpu"] = {str(k): s for k, s in seconds.items()}
            per_gpu = choose(seconds)
        return per_gpu, self._gpu_cpu(per_gpu, spec_cpu)

    def _gpu_cpu(self, per_gpu: int, spec_cpu: float | str) -> float:
        if spec_cpu != "auto":
            return spec_cpu
        return max(1, self.node_cpus // max(1, per_gpu * self.node_gpus))

    def _bundle_cap(self, per_gpu: int, cpu: float) -> int:
        """The size `auto` gave before it measured (one bundle per trial slot): the largest one timed."""
        resolved = {"cpu": cpu, "gpu": 1 / per_gpu if per_gpu else 0.0, "bundle": "auto"}
        total = {"CPU": self.node_cpus * self.nodes, "GPU": self.node_gpus * self.nodes}
        return self.bundle_cap(apply(self.loaded, resolved), total)

    def _bundle_only_and_short(self) -> bool:
        """Whether ``bundle`` is the only setting to time and timing it cannot pay off, judged from an
        in-process estimate before any timer actor starts (sets :attr:`skipped`). A driver slower than the
        trials' nodes (a GPU sweep from a CPU login node) overestimates the sweep, so it times as before."""
        spec = self.spec
        if (
            spec.bundle != "auto"
            or spec.resources.cpu == "auto"
            or (self.on_gpu and self.gpu_setting == "auto")
        ):
            return False
        per_gpu, cpu = self._concurrency({})
        cap = self._bundle_cap(per_gpu, cpu)
        if cap == 1:
            return False  # nothing to time
        together = per_gpu if per_gpu else max(1, round(self.node_cpus / cpu))
        step_s, prepare_s = self.timers.estimate(self.cfg, max(1, int(cpu)))
        self.timings["estimate"] = {"1": step_s / together}
        sizes = len(_doublings(cap))
        return not self._pays_off(sizes, ACTOR_START_S + sizes * (prepare_s + WINDOW_S), step_s / together)

    def _pays_off(self, sizes: int, cost_s: float, node_s_per_step: float) -> bool:
        """Whether timing ``sizes`` bundle sizes for ``cost_s`` seconds costs at most PAYOFF of the sweep's
        estimated training time (else :attr:`skipped` records why not)."""
        training_s = self._training_s(node_s_per_step)
        if cost_s <= PAYOFF * training_s:
            return True
        self.skipped = (sizes, cost_s, training_s)
        return False

    def _bundle(self, per_gpu: int, cpu: float, identity: dict[str, Any]) -> int:
        from trainables.memory import estimate_bytes

        cap = self._bundle_cap(per_gpu, cpu)
        if cap == 1:
            return 1
        together = per_gpu if per_gpu else max(1, round(self.node_cpus / cpu))
        gpu_share = 1 / per_gpu if per_gpu else 0.0
        # Within the memory estimate: a GPU's share per slot, or half the node's memory over its slots.
        if per_gpu:
            budget = GPU_MEMORY_USE * identity["gpu_memory"] / per_gpu
        else:
            budget = 0.5 * identity["memory"] / together
        sizes = [b for b in _doublings(cap) if b == 1 or estimate_bytes(self.cfg, b) <= budget]
        started = time.perf_counter()
        seconds = {1: self.timers.time(self.cfg, 1, together, cpu, gpu_share)}
        # What one more size costs, from what the first cost (a pessimistic figure when the first
        # started the timer actors too: the other sizes reuse them).
        each_s = time.perf_counter() - started
        rest = sizes[1:]
        if not self._pays_off(len(rest), len(rest) * each_s, seconds[1]):
            self.timings["bundle"] = {"1": seconds[1]}
            return 1
        seconds.update({b: self.timers.time(self.cfg, b, together, cpu, gpu_share) for b in rest})
        self.timings["bundle"] = {str(b): s for b, s in seconds.items()}
        return choose(seconds)

    def _training_s(self, node_s_per_step: float) -> float:
        """The sweep's training time at bundle 1, estimated from the node time per trial step: every trial's
        steps (epochs x batches per epoch; metric passes left out), shared by the nodes."""
        from trainables.loop import batch_starts
        from trainables.memory import split_sizes

        runs = self.spec.search.optuna.trials_per_cell if self.spec.search else 1
        steps = sum(
            t.config.train.epochs * len(batch_starts(split_sizes(t.config)[0], t.config.train.batch_size))
            for t in self.trials
        )
        return node_s_per_step * steps * runs / self.nodes

    # ---- records --------------------------------------------------------------------------------------
    def _cache_key(self, identity: dict[str, Any]) -> str:
        from trainables.data import dataset_info

        cfg = self.cfg
        data = cfg.model_dump(mode="json")
        key = {
            "architecture": cfg.architecture,
            "model": data["model"][cfg.architecture] if cfg.architecture in data["model"] else data["model"],
            "input": list(dataset_info(cfg).input_shape),
            "classes": dataset_info(cfg).num_classes,
            "batch_size": cfg.train.batch_size,
            "loss": cfg.train.loss,
            "svsl": cfg.svsl.alpha > 0,
            "device": identity["device"],
            "torch": identity["torch"],
            "node_cpus": self.node_cpus,
            "node_gpus": self.node_gpus,
            "asked": [self.spec.resources.cpu, self.spec.resources.gpu],
            "bundle": self.spec.bundle,
            "trials": len(self.trials),
            "search": self.spec.search.optuna.trials_per_cell if self.spec.search else None,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _reason(self, bundle: int, cpu: float, gpu: float, device: str) -> str:
        parts = []
        where = f"{device}, {self.node_cpus} CPUs per node"
        for name, label in (("trials_per_gpu", "trials per GPU"), ("trials_per_node", "trials per node")):
            if name in self.timings:
                chosen = round(1 / gpu) if name == "trials_per_gpu" else round(self.node_cpus / cpu)
                parts.append(f"{chosen} {label} ({_compare(self.timings[name], chosen)})")
        if self.skipped is not None:
            sizes, cost, training = self.skipped
            parts.append(
                f"bundle 1 (not timed: {sizes} size(s) would take ~{cost:.1f} s, over {PAYOFF:.0%} of the "
                f"sweep's ~{training:.0f} s of training at 1, so cannot pay off)"
            )
        elif "bundle" in self.timings:
            parts.append(f"bundle {bundle} ({_compare(self.timings['bundle'], bundle)})")
        elif self.spec.bundle == "auto":
            parts.append("bundle 1 (one trial per slot already fills the slots)")
        if "estimate" in self.timings:  # nothing was timed on a node
            step = self.timings["estimate"]["1"]
            return (
                f"{', '.join(parts)}: from {step * 1e3:.3g} ms of node time per trial step, timed in {device}"
            )
        return (
            f"{', '.join(parts)}: node time per trial step, timed on {where}; a larger setting must be "
            f"{TIE:.0%} faster"
        )


class RayTimers:
    """:class:`trainables.calibrate.StepTimer` actors in a placement group, so the ``together`` timers of
    one measurement share one node as that many trials would."""

    def __init__(self) -> None:
        self._current: tuple[tuple[int, float, float], Any, list[Any]] | None = None

    def identity(self, gpu: bool) -> dict[str, Any]:
        import ray

        (actor,) = self._pool(1, 1, 1.0 if gpu else 0.0)
        return ray.get(actor.identity.remote())

    def estimate(self, cfg: TrialConfig, threads: int) -> tuple[float, float]:
        """In the driver's process, with its torch threads restored afterwards."""
        import torch

        from trainables.calibrate import StepTimer

        started, before = time.perf_counter(), torch.get_num_threads()
        try:
            step_s = StepTimer(cfg, 1, threads).time(ESTIMATE_S)
        finally:
            torch.set_num_threads(before)
        return step_s, time.perf_counter() - started

    def time(self, cfg: TrialConfig, members: int, together: int, cpu: float, gpu: float) -> float:
        import ray

        actors = self._pool(together, cpu, gpu)
        # Torch threads as the trial gets them (sweeper.trial): its whole CPUs.
        ray.get([a.prepare.remote(cfg.model_dump(mode="json"), members, max(1, int(cpu))) for a in actors])
        # Started together once all are ready, so each step is timed while the others run.
        per_actor = ray.get([a.time.remote(WINDOW_S) for a in actors])
        return sum(per_actor) / len(per_actor) / together

    def _pool(self, together: int, cpu: float, gpu: float) -> list[Any]:
        """``together`` timer actors packed on one node (a placement group), reused while the shape stays
        the same (an actor takes seconds to start: it imports torch)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        shape = (together, cpu, gpu)
        if self._current is not None and self._current[0] == shape:
            return self._current[2]
        self.close()  # its reservation would block the next group on a small node
        bundle = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
        group = placement_group([bundle] * together, strategy="STRICT_PACK")
        ray.get(group.ready())
        actors = [
            _timer_actor()
            .options(
                num_cpus=cpu,
                num_gpus=gpu,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            )
            .remote()
            for i in range(together)
        ]
        self._current = (shape, group, actors)
        return actors

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self._current is None:
            return
        _, group, actors = self._current
        self._current = None
        for a in actors:
            ray.kill(a)
        remove_placement_group(group)


def _compare(timings: dict[str, float], chosen: int) -> str:
    return ", ".join(
        f"{k}: {v * 1e3:.3g} ms" + (" <-" if int(k) == chosen else "") for k, v in timings.items()
    )


def _doublings(cap: int) -> list[int]:
    """1, 2, 4, ... below ``cap``, and ``cap``."""
    out, n = [], 1
    while n < cap:
        out.append(n)
        n *= 2
    return out + [max(1, cap)]


def _read_cache(storage: Location) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(CACHE_FILE)) if storage.exists(CACHE_FILE) else {}
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a measurement


def _write_cache(storage: Location, cache: dict[str, Any]) -> None:
    try:
        storage.write_text(CACHE_FILE, json.dumps(cache, indent=2))
    except OSError as err:
        print(f"warning: cannot cache calibration in {storage}: {err}", file=sys.stderr)


_ACTOR = None


def _timer_actor():
    """The Ray actor class around StepTimer (made once per process, where Ray is imported)."""
    global _ACTOR
    if _ACTOR is None:
        import ray

        class StepTimerActor:
            def identity(self) -> dict[str, Any]:
                import torch

                from trainables.calibrate import device_name

                device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
                memory = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else 0
                import psutil

                return {
                    "device": device_name(device),
                    "torch": torch.__version__,
                    "gpu_memory": memory,
                    "memory": psutil.virtual_memory().total,
                }

            def prepare(self, cfg: dict[str, Any], members: int, threads: int) -> None:
                from trainables.calibrate import StepTimer
                from trainables.config import TrialConfig

                self.timer = StepTimer(TrialConfig.model_validate(cfg), members, threads)

            def time(self, seconds: float) -> float:
                return self.timer.time(seconds)

        _ACTOR = ray.remote(StepTimerActor)
    return _ACTOR
