"""The trainer's speed against the loops it replaces and the machine's limit: seed 000's MLP, MNIST shapes.

Sections (each prints one Markdown table; ratios compare numbers from this run only):
- ``epoch``: one training epoch of the trainer (device-resident tensors, randperm batches) against the
  torchvision-style loop it replaces (``torchvision.datasets.MNIST`` with per-sample ``ToTensor`` +
  ``Normalize`` in a ``DataLoader``), same model, optimizer and batch size; plus the compiled step
  (``train.compile: on``) and trial bundles (per model); each loop's achieved GFLOP/s (torch's FLOP
  counter) against a large GEMM timed in the same run.
- ``metrics``: the per-epoch measurement with every NC metric (metric subset of the train split + test
  split) against the epoch; and the same pass without NC metrics; a bundle's metric pass per member,
  members one at a time against the stacked pass.
- ``mlflow``: logging one epoch's metrics (one ``log_batch`` to a SQLite store, as trials do) against
  the epoch.
- ``logging``: a bundle's members logging one epoch each to a real ``mlflow server`` (SQLite and
  PostgreSQL backends), one after the other against in the background (not in ``--quick``: a server takes
  10-20 s to start on 2 cores).
- ``throughput``: trials per hour of seed 000's protocol (300 epochs, metrics every epoch): one trial,
  several packed on the device as separate processes, bundles (no Ray: the GPU machines have none).
- ``calibration``: what ``bundle: auto`` and ``resources: auto`` choose here (sweeper.calibration), with
  the timings they chose by.
- ``sweep``: the wall time of a real local Ray sweep against its ideal, the sum of its trials' own run
  times (MLflow start to end) over the trials that fit at once.

The data are MNIST-format IDX files written here (class templates plus noise, 28 x 28 uint8), read by
torchvision's own MNIST class in both loops, since these machines cannot download MNIST.

Run: ``python benchmarks/bench_speed.py [--quick] [--sections epoch,metrics,mlflow,throughput,calibration,sweep]``. ``--quick``
is the CI-sized form (3,000 training samples instead of 60,000, fewer rows, no compiled step). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_metrics import _median_time as _median  # the script's folder is on sys.path

SEED000_MLP = {"preset": "seed000"}
TRAIN = {"epochs": 300, "batch_size": 128, "optimizer": {"lr": 0.05}}
DEVICE = "cpu"  # --device: the epoch and metric sections run on CUDA too (no Ray, no MLflow needed)


def write_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """MNIST-format IDX files under ``root/MNIST/raw``: learnable classes (a fixed template per class plus
    noise), so the metrics see real class structure."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, 28, 28))
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        images = np.clip(templates[labels] * 0.5 + rng.normal(0, 60, size=(n, 28, 28)) + 64, 0, 255)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.astype(np.uint8).tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes()
        )
    return root


def trial_config(root: Path, **extra):
    from trainables.config import TrialConfig

    data = {
        "dataset": "mnist",
        "data": {"root": str(root), "download": False},
        "model": {"mlp": SEED000_MLP},
        "train": TRAIN,
        "device": DEVICE,
    }
    data.update(extra)
    return TrialConfig.model_validate(data)


def dataloader_loop(root: Path, workers: int):
    """The usual torchvision loop (3.2 s/epoch measured on an H100 host): per-sample transforms in a DataLoader.
    Returns a function that runs one epoch (the first call also starts the workers)."""
    import torchvision
    from torchvision import transforms

    from trainables.data import dataset_info
    from trainables.models import build_model

    cfg = trial_config(root)
    torch.manual_seed(0)
    model = build_model(cfg, dataset_info(cfg)).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = torchvision.datasets.MNIST(str(root), train=True, transform=tf, download=False)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=128, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )

    def epoch():
        model.train()
        for x, y in loader:
            x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        float(loss.detach())  # wait for the device

    return epoch


def _interleaved(loops: dict[str, object], repeats: int) -> dict[str, float]:
    """Median seconds per call of each loop, timed in rounds (one call of each per round) after one
    warm-up call each, so that drift in this machine's speed reaches every loop alike."""
    for fn in loops.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, fn in loops.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_epoch(root: Path, repeats: int, bundle_sizes: list[int], quick: bool) -> list[tuple[str, float]]:
    """The trainer's epoch and the DataLoader loops are timed in alternation (see :func:`_interleaved`);
    the compiled step and bundles, per model, after them."""
    from trainables.bundle import Bundle
    from trainables.loop import Trainer

    trainer = Trainer(trial_config(root))
    loops = {"trainer epoch (tensors in memory, randperm batches)": trainer.train_epoch}
    for workers in (0,) if quick else (0, 2):
        loops[f"DataLoader loop, torchvision transforms, {workers} workers"] = dataloader_loop(root, workers)
    timed = _interleaved(loops, repeats)
    rows = list(timed.items())[:1]
    del loops  # the DataLoaders' worker processes go before the compiled step and bundles are timed
    if not quick:  # compiling (~20 s on 2 CPU cores) would outlast the CI-sized run itself
        # train.compile: on (inductor; on CUDA its CUDA graphs). The warm-up epoch compiles both batch sizes.
        trainer = Trainer(trial_config(root, train={**TRAIN, "compile": "on"}))
        started = time.perf_counter()
        trainer.train_epoch()
        warm = time.perf_counter() - started
        name = f"trainer epoch, compiled step (first epoch with compiling: {warm:.1f} s)"
        rows.append((name, _median(trainer.train_epoch, repeats)))
    for size in bundle_sizes:
        bundle = Bundle([trial_config(root, seed=s) for s in range(size)])
        bundle.train_epoch()
        per_model = _median(lambda b=bundle: b.train_epoch().tolist(), repeats) / size
        rows.append((f"bundle of {size}, per model", per_model))
    return rows + list(timed.items())[1:]


def flops_per_sample(root: Path) -> float:
    """Forward + backward FLOPs of one training sample of the trainer's loss, counted by torch's FLOP
    counter over one batch (matmuls and convolutions; element-wise work such as BatchNorm, ReLU and the
    optimizer is not counted, so the achieved rate below is a lower bound)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainables.loop import Trainer

    trainer = Trainer(trial_config(root))
    batch = trainer.cfg.train.batch_size
    x, y = trainer.data.x_train[:batch], trainer.data.y_train[:batch]
    with FlopCounterMode(display=False) as counter:
        trainer._loss(x, y).backward()
    return counter.get_total_flops() / batch


def matmul_peak(repeats: int, n: int = 2048) -> float:
    """FLOP/s of a large float32 GEMM on this device with this run's threads: what the hardware does at
    best on the work an MLP is made of (the trainer's ceiling, measured rather than taken from a sheet)."""
    a = torch.randn(n, n, device=DEVICE)
    b = torch.randn(n, n, device=DEVICE)

    def gemm():
        for _ in range(4):
            a @ b
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    gemm()
    return 4 * 2 * n**3 / _median(gemm, max(3, repeats))


PROTOCOL_EPOCHS = 300
"""Seed 000's MLP protocol: 300 epochs, every NC metric every epoch (the trials-per-hour unit)."""


class _BundleEpochTimes:
    """Every bundle member's reporter: a member's epoch time runs from the bundle's epoch start, so the
    last member's is the bundle's."""

    def __init__(self, times: dict[int, float]) -> None:
        self.times = times

    def report(self, epoch, metrics, state) -> None:
        self.times[epoch] = max(self.times.get(epoch, 0.0), metrics["epoch_time_s"])


def bench_throughput(root: Path, epochs: int, packs: list[int], bundles: list[int]) -> list[dict]:
    """Trials per hour of seed 000's protocol on this device, extrapolated from ``epochs`` measured epochs
    (each with its full NC metric pass): per-trial time = start-up + 300 x the median epoch after the
    first. ``packs``: that many ``python -m trainables`` processes at once, the Ray-free trial a Tune
    worker runs (1 = one trial per device; more = fractional packing, each process on the same device).
    ``bundles``: trial bundles of that many seeds in one process. No Ray or MLflow in either."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    from trainables.bundle import Bundle

    rows = []
    trial = root / "throughput-trial.yaml"
    trial.write_text(
        yaml.safe_dump(trial_config(root, train={**TRAIN, "epochs": epochs}).model_dump(mode="json"))
    )
    cores = os.cpu_count() or 1
    for k in packs:
        # On a CPU the k processes share its cores, as Ray's per-trial OMP_NUM_THREADS would make them.
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // k))}
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "trainables", str(trial)], stdout=subprocess.PIPE, text=True, env=env
            )
            for _ in range(k)
        ]
        epoch_times, startups = [], []
        for proc in procs:
            lines = [json.loads(line) for line in proc.stdout if line.startswith('{"epoch"')]
            if proc.wait() != 0:
                raise RuntimeError(f"python -m trainables failed with exit code {proc.returncode}")
            epoch_times.append(statistics.median(r["epoch_time_s"] for r in lines[1:]))
            startups.append(lines[0]["epoch_time_s"])  # the first epoch: warm-up (compiling on CUDA)
        wall = time.perf_counter() - started
        epoch_s = statistics.median(epoch_times)
        # Start-up: what the wall took beyond the epochs (process start, imports, data, first epoch).
        startup = max(0.0, wall - (epochs - 1) * epoch_s)
        per_trial = startup + PROTOCOL_EPOCHS * epoch_s
        how = "one trial" if k == 1 else f"{k} trials packed (separate processes)"
        rows.append(
            {"how": how, "at_once": k, "epoch": epoch_s, "startup": startup, "per_hour": k * 3600 / per_trial}
        )
    for m in bundles:
        started = time.perf_counter()
        bundle = Bundle([trial_config(root, seed=s, train={**TRAIN, "epochs": epochs}) for s in range(m)])
        times: dict[int, float] = {}
        bundle.run([_BundleEpochTimes(times) for _ in range(m)])
        wall = time.perf_counter() - started
        epoch_s = statistics.median(times[e] for e in sorted(times)[1:])
        startup = max(0.0, wall - (epochs - 1) * epoch_s)
        per_bundle = startup + PROTOCOL_EPOCHS * epoch_s
        rows.append(
            {
                "how": f"bundle of {m}",
                "at_once": m,
                "epoch": epoch_s,
                "startup": startup,
                "per_hour": m * 3600 / per_bundle,
            }
        )
    return rows


def bench_metrics(root: Path, repeats: int) -> dict[str, float]:
    from trainables.loop import Trainer
    from trainables.measure import measure

    trainer = Trainer(trial_config(root))
    cfg = trainer.cfg.metrics

    def metric_pass(collapse: bool):
        return measure(
            trainer.model, trainer.splits, 10, batch_size=cfg.batch_size, collapse=collapse, loss="ce"
        )

    timed = _interleaved(
        {
            "epoch": trainer.train_epoch,
            "full": lambda: metric_pass(True),
            "plain": lambda: metric_pass(False),
        },
        repeats,
    )
    return {
        **timed,
        "train_subset": len(trainer.splits["train"][0]),
        "test": len(trainer.splits["test"][0]),
        "keys": len(metric_pass(True)),
    }


NOT_KERNELS = set(
    "as_strided as_strided_ view reshape _reshape_alias _unsafe_view expand transpose t mT unsqueeze squeeze "
    "select slice permute diagonal alias detach resolve_conj resolve_neg empty empty_strided empty_like "
    "lift_fresh to result_type scalar_tensor _local_scalar_dense item".split()
)
"""aten operators that launch no kernel: views, allocation, no-op conversions, host-side scalars."""


def bench_bundle_metrics(root: Path, repeats: int, size: int) -> dict[str, float]:
    """A bundle's metric pass per member: each member measured alone in turn (before the stacked pass)
    against all members in one stacked pass (``Bundle.measure``), in time and in aten operators
    that compute (each a kernel launch on a GPU, where small models are launch-bound)."""
    from torch.profiler import ProfilerActivity, profile

    from trainables.bundle import Bundle
    from trainables.measure import measure

    bundle = Bundle([trial_config(root, seed=s) for s in range(size)])
    bundle.train_epoch()
    bundle._unstack()  # the members' own modules, for measuring them one at a time
    batch = bundle.cfgs[0].metrics.batch_size
    members = list(range(size))

    def one_at_a_time():
        return [measure(m.model, m.splits, 10, batch_size=batch, collapse=True) for m in bundle.members]

    def stacked():
        return bundle.measure(members)

    def operators(fn) -> int:
        """Leaf aten operators that compute: on a GPU, each is a kernel launch."""
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return sum(
            1
            for e in prof.events()
            if e.name.startswith("aten::")
            and e.name[6:] not in NOT_KERNELS
            and not any(c.name.startswith("aten::") for c in e.cpu_children)
        )

    one_at_a_time(), stacked()  # warm-up
    return {
        "alone": _median(one_at_a_time, repeats) / size,
        "stacked": _median(stacked, repeats) / size,
        "alone_ops": operators(one_at_a_time) / size,
        "stacked_ops": operators(stacked) / size,
    }


def bench_mlflow(root: Path, repeats: int) -> dict[str, float]:
    import mlflow  # noqa: F401  (import cost outside the timing)
    from mlflow.tracking import MlflowClient

    from sweeper.tracking import TrialTracker
    from trainables.loop import Trainer

    trainer = Trainer(trial_config(root))
    epoch = _median(trainer.train_epoch, repeats)
    metrics = trainer.end_epoch(0.0, 0.05, time.perf_counter())
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(uri)
        # Artifacts (the tracker's config.json) in tmp, not ./mlruns of whatever folder this runs from.
        exp = client.create_experiment("bench", artifact_location=Path(tmp, "artifacts").as_uri())
        parent = client.create_run(exp).info.run_id
        tracker = TrialTracker(
            tracking_uri=uri,
            experiment_id=exp,
            parent_run_id=parent,
            sweep_id="bench",
            trial_key="t0",
            run_name="t0",
            params=trainer.cfg.model_dump(mode="json"),
            tags={},
        )
        times = []
        for step in range(1, 2 + 4 * repeats):
            start = time.perf_counter()
            tracker.log_epoch(step, metrics)
            times.append(time.perf_counter() - start)
    return {"epoch": epoch, "log": statistics.median(times[1:]), "keys": len(metrics)}


def bench_bundle_logging(root: Path, repeats: int, members: int) -> list[dict]:
    """One epoch of a bundle's members logged to a real ``mlflow server`` (as a sweep on a cluster does):
    one member after the other (``log_epoch``) against all in the background and then ``flush``, as
    ``BundleReporter`` does, over a SQLite and, where its binaries are installed, a PostgreSQL backend
    (docker-compose.yml's). Each member logs a full epoch's metrics to its own run."""
    import sys
    from contextlib import ExitStack

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' real-service helpers
    from tests.services import mlflow_server, postgres_available, postgres_server
    from trainables.loop import Trainer

    trainer = Trainer(trial_config(root))
    trainer.train_epoch()
    metrics = trainer.end_epoch(0.0, 0.05, time.perf_counter())
    rows = []
    for backend in ["sqlite"] + (["postgresql"] if postgres_available() else []):
        with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
            store = (
                f"sqlite:///{tmp}/mlflow.db"
                if backend == "sqlite"
                else stack.enter_context(postgres_server())
            )
            uri = stack.enter_context(mlflow_server(store, tmp))
            sequence, background = _log_bundle_epochs(uri, trainer.cfg, metrics, members, repeats)
            rows.append({"backend": backend, "sequence": sequence, "background": background})
    return rows


def _log_bundle_epochs(uri: str, cfg, metrics: dict, members: int, repeats: int) -> tuple[float, float]:
    """Seconds per member to log one epoch: in sequence, and in the background then flushed."""
    from mlflow.tracking import MlflowClient

    from sweeper.tracking import TrialTracker

    exp = MlflowClient(uri).create_experiment("bench")
    params = cfg.model_dump(mode="json")
    trackers = [
        TrialTracker(
            tracking_uri=uri,
            experiment_id=exp,
            parent_run_id="bench",
            sweep_id="bench",
            trial_key=f"m{i}",
            run_name=f"m{i}",
            params=params,
            tags={},
        )
        for i in range(members)
    ]
    epochs = iter(range(1, 1000))

    def in_sequence():
        epoch = next(epochs)
        for t in trackers:
            t.log_epoch(epoch, metrics)

    def in_background():
        epoch = next(epochs)
        for t in trackers:
            t.log_epoch(epoch, metrics, wait=False)
        for t in trackers:
            t.flush()

    in_sequence(), in_background()  # warm-up: connections, the server's first writes
    return _median(in_sequence, repeats) / members, _median(in_background, repeats) / members


def bench_sweep(root: Path, trials: int, epochs: int, bundle: int | str) -> dict[str, float]:
    import yaml
    from mlflow.tracking import MlflowClient

    from sweeper.orchestrate import run_sweep
    from sweeper.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "name": "bench",
            "experiment": "bench",
            "dataset": "mnist",
            "data": {"root": str(root), "download": False},
            "model": {"mlp": SEED000_MLP},
            "train": {"epochs": epochs, "batch_size": 128, "optimizer": {"lr": 0.05}},
            "checkpoint": {"every": epochs},
            "device": "cpu",
            "grid": {"seed": list(range(trials))},
            "resources": {"cpu": 1},
            "bundle": bundle,
        }
        path = Path(tmp) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        uri = f"sqlite:///{tmp}/mlflow.db"
        started = time.perf_counter()
        result = run_sweep(
            load_spec(path), storage=Path(tmp) / "sweeps", address=None, tracking_uri=uri, progress=False
        )
        wall = time.perf_counter() - started
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
        children = [r for r in runs if r.data.tags.get("sweeper.role") == "trial"]
        assert len(children) == trials and all(o.status == "FINISHED" for o in result.outcomes)
        own = sum((r.info.end_time - r.info.start_time) / 1000 for r in children)
    slots = 2  # this machine's CPUs over resources.cpu: 1
    return {"wall": wall, "sum": own, "slots": slots, "ideal": own / slots}


def bench_calibration(root: Path) -> list[dict]:
    """What ``bundle: auto`` and ``resources: {cpu: auto, gpu: auto}`` choose on this machine, through the
    sweeper's own calibration in a local Ray session, for seed 000's MLP and the quickstart model: 16
    seeds each, so bundles of up to 8 per slot are candidates."""
    import ray
    import yaml

    from sweeper.location import parse_location
    from sweeper.orchestrate import calibrate, prepare_sweep_dir
    from sweeper.spec import expand, load_spec

    models = {
        "seed 000 MLP (28x28, batch 128)": {
            "dataset": "mnist",
            "data": {"root": str(root), "download": False},
            "model": {"mlp": SEED000_MLP},
            "train": {"batch_size": 128},
        },
        "quickstart MLP (digits 8x8, depth 4, width 64, batch 128)": {
            "dataset": "digits",
            "model": {"mlp": {"depth": 4, "width": 64, "batchnorm": True, "activation": "relu"}},
            "train": {"batch_size": 128},
        },
    }
    rows = []
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    try:
        for name, model in models.items():
            with tempfile.TemporaryDirectory() as tmp:
                spec = {
                    "name": "calibration",
                    **model,
                    "device": DEVICE,
                    "grid": {"seed": list(range(16))},
                    "bundle": "auto",
                    "resources": {"cpu": "auto", "gpu": "auto"},
                }
                path = Path(tmp) / "spec.yaml"
                path.write_text(yaml.safe_dump(spec))
                loaded = load_spec(path)
                storage = parse_location(Path(tmp) / "sweeps")
                prepare_sweep_dir(loaded, storage.child("calibration"), f"sqlite:///{tmp}/mlflow.db")
                _, record = calibrate(loaded, expand(loaded), storage.child("calibration"), storage)
                rows.append({"model": name, **record})
    finally:
        ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: 3,000 training samples")
    parser.add_argument("--sections", default="epoch,metrics,mlflow,throughput,sweep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (epoch and metrics sections)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    sections = args.sections.split(",")
    n_train, n_test = (3_000, 500) if args.quick else (60_000, 10_000)
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"device {DEVICE}{' (' + torch.cuda.get_device_name() + ')' if DEVICE == 'cuda' else ''}, "
        f"torch {torch.__version__}; {n_train:,} train / {n_test:,} test 28x28 samples; seed 000 MLP "
        f"(depth 5, width 128, BN), batch 128; medians of {args.repeats}\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = write_mnist(Path(tmp), n_train, n_test)
        if "epoch" in sections:
            rows = bench_epoch(root, args.repeats, [4] if args.quick else [4, 16], args.quick)
            trainer = next(t for name, t in rows if name.startswith("trainer"))
            flops = flops_per_sample(root) * n_train
            peak = matmul_peak(args.repeats)
            print(
                f"FLOPs per epoch {flops / 1e9:.1f} G ({flops / n_train / 1e6:.3f} MFLOP per sample, forward + "
                f"backward, torch's FLOP counter); measured peak: {2048}^3 float32 GEMM at {peak / 1e9:.1f} "
                "GFLOP/s\n"
            )
            print(
                "| loop | s/epoch | vs trainer | GFLOP/s | of GEMM peak |\n| --- | ---: | ---: | ---: | ---: |"
            )
            for name, t in rows:
                print(
                    f"| {name} | {t:.3f} | {t / trainer:.2f}x | {flops / t / 1e9:.1f} | {flops / t / peak:.0%} |"
                )
            print()
        if "metrics" in sections:
            m = bench_metrics(root, args.repeats)
            print(
                "| train epoch (s) | NC metric pass (s) | metric / epoch | acc+loss only (s) | samples measured | keys |"
            )
            print("| ---: | ---: | ---: | ---: | ---: | ---: |")
            print(
                f"| {m['epoch']:.3f} | {m['full']:.3f} | {m['full'] / m['epoch']:.1%} | {m['plain']:.3f} | "
                f"{m['train_subset']:,} + {m['test']:,} | {m['keys']} |\n"
            )
            size = 4 if args.quick else 16 if DEVICE == "cpu" else 64
            b = bench_bundle_metrics(root, args.repeats, size)
            print(
                f"| bundle of {size}: metric pass per member | one member at a time | stacked | ratio |\n"
                "| --- | ---: | ---: | ---: |"
            )
            print(f"| time (s) | {b['alone']:.3f} | {b['stacked']:.3f} | {b['alone'] / b['stacked']:.2f}x |")
            print(
                f"| aten kernels (leaf operators that compute) | {b['alone_ops']:,.0f} | {b['stacked_ops']:,.0f} | "
                f"{b['alone_ops'] / b['stacked_ops']:.1f}x |\n"
            )
        if "mlflow" in sections:
            m = bench_mlflow(root, args.repeats)
            print("| train epoch (s) | MLflow log_batch per epoch (s) | log / epoch | metrics per epoch |")
            print("| ---: | ---: | ---: | ---: |")
            print(f"| {m['epoch']:.3f} | {m['log']:.4f} | {m['log'] / m['epoch']:.1%} | {m['keys']} |\n")
        if "logging" in sections:
            members = 16
            rows = bench_bundle_logging(root, args.repeats, members)
            print(
                f"| bundle of {members}, one epoch to an mlflow server: per member | in sequence (s) | "
                "in the background (s) | ratio |\n| --- | ---: | ---: | ---: |"
            )
            for r in rows:
                print(
                    f"| {r['backend']} backend | {r['sequence']:.4f} | {r['background']:.4f} | "
                    f"{r['sequence'] / r['background']:.2f}x |"
                )
            print()
        if "throughput" in sections:
            epochs = 2 if args.quick else 4
            packs, bundles = ([2], [2]) if args.quick else ([1, 2, 4], [4, 16])
            if DEVICE == "cuda":
                packs, bundles = [1, 4, 8], [16, 64, 256]
            rows = bench_throughput(root, epochs, packs, bundles)
            print(
                f"| seed 000 protocol ({PROTOCOL_EPOCHS} epochs, metrics every epoch) | trials at once | "
                "s/epoch (with metrics) | start-up (s) | trials/hour |"
            )
            print("| --- | ---: | ---: | ---: | ---: |")
            for r in rows:
                print(
                    f"| {r['how']} | {r['at_once']} | {r['epoch']:.3f} | {r['startup']:.1f} | {r['per_hour']:.1f} |"
                )
            print()
        if "calibration" in sections:
            print("| model | setting | timed (ms per trial step, node busy) | chosen | measuring (s) |")
            print("| --- | --- | --- | ---: | ---: |")
            for r in bench_calibration(root):
                timings = r["timings_s_per_trial_step"]
                chosen = {"trials_per_node": round(r["node_cpus"] / r["cpu"]), "bundle": r["bundle"]}
                chosen["trials_per_gpu"] = round(1 / r["gpu"]) if r["gpu"] else 0
                for setting, values in timings.items():
                    timed = ", ".join(f"{k}: {v * 1e3:.3g}" for k, v in values.items())
                    print(
                        f"| {r['model']} | {setting.replace('_', ' ')} | {timed} | {chosen[setting]} | "
                        f"{r['measuring_s']} |"
                    )
            print()
        if "sweep" in sections:
            trials, epochs = (4, 3) if args.quick else (8, 20)
            print(
                "| sweep | trials x epochs | wall (s) | sum of trial runs (s) | ideal = sum / 2 slots (s) | wall / ideal |"
            )
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            s = bench_sweep(root, trials, epochs, 1)
            print(
                f"| one trial per Tune trial | {trials} x {epochs} | {s['wall']:.1f} | {s['sum']:.1f} | "
                f"{s['ideal']:.1f} | {s['wall'] / s['ideal']:.2f} |"
            )
            b = bench_sweep(root, trials, epochs, "auto")
            # A member's run spans its whole bundle, so "sum / slots" is no ideal there: compare walls.
            print(
                f"| bundle: auto (2 bundles) | {trials} x {epochs} | {b['wall']:.1f} | - | - | "
                f"{b['wall'] / s['wall']:.2f} of the unbundled wall |"
            )


if __name__ == "__main__":
    main()
