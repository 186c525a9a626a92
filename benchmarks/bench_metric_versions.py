"""The metric pass under metric-definition version 1 and version 2, side by side in one run.

Version 2 (``trainables/metrics.py`` today) changes nc1's pseudo-inverse and nc3_alignment, brackets the
stable rank of wide taps with a power-iterated subspace and error probes, and adds gnc2, unc3, the
classifier's nc2 and the optional probe. Version 1 is read from git (the last commit that had it) into a
module of its own, so both engines measure the same model on the same samples in alternating rounds (this
VM's speed drifts between minutes: alternating puts the drift on both sides of each ratio).

Cases:
- ``seed000-mlp``: seed 000's Fashion-MNIST MLP (5 layers of 128, BatchNorm) on 28 x 28 inputs, its 4
  taps on the 10,000-sample train metric subset and a 10,000-sample test split (synthetic pixels: the cost
  does not depend on them);
- ``resnet18-28px``: ResNet18 on 1 x 28 x 28 inputs (Fashion-MNIST-sized), every tap including layer1
  (64 x 28 x 28 = 50,176 wide), on ``--resnet-samples`` per split (CPU-sized; the cost is linear in it).

Run: ``python benchmarks/bench_metric_versions.py [--quick] [--repeats N] [--base COMMIT]``. Prints a Markdown table of
medians; nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainables import measure as measure_module
from trainables.config import TrialConfig
from trainables.data import DatasetInfo
from trainables.models import build_model

V1_COMMIT = "3d48731"
"""The last commit whose ``trainables/metrics.py`` computed metric-definition version 1."""


def module_at(commit: str, path: str, name: str, edit=lambda source: source):
    """The file ``path`` of git commit ``commit`` imported as module ``name`` (``edit`` may rewrite its
    source first, e.g. its imports), registered in ``sys.modules``."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{commit}:{path}"], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    folder = Path(tempfile.mkdtemp())
    (folder / f"{name}.py").write_text(edit(source))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_v1_engine(commit: str = V1_COMMIT):
    """Version 1's ``trainables/metrics.py`` (or ``commit``'s) as a module, adapted to today's
    ``measure_stack`` calls."""
    module = module_at(commit, "trainables/metrics.py", f"metrics_{commit[:8]}")

    class V1Accumulator(module.TapAccumulator):
        def __init__(self, *args, probe=None, **kwargs):
            super().__init__(*args, **kwargs)

        def end_pass1(self, ncc_means=None, probe=None):
            return super().end_pass1(ncc_means)

    return V1Accumulator


def _model_and_splits(case: str, samples: int):
    gen = torch.Generator().manual_seed(0)
    if case == "seed000-mlp":
        cfg = TrialConfig.model_validate(
            {"dataset": "fashion_mnist", "model": {"mlp": {"preset": "seed000"}}}
        )
        n_train = n_test = samples
    else:
        cfg = TrialConfig.model_validate({"dataset": "fashion_mnist", "architecture": "resnet18"})
        n_train = n_test = samples
    info = DatasetInfo(input_shape=(1, 28, 28), num_classes=10)
    model = build_model(cfg, info).eval()
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = torch.arange(n) % 10
        splits[split] = (torch.randn(n, 1, 28, 28, generator=gen) + y[:, None, None, None] / 10, y)
    return model, splits


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(case: str, samples: int, repeats: int, batch_size: int, v1) -> dict:
    model, splits = _model_and_splits(case, samples)
    v2 = measure_module.TapAccumulator
    engines = {"v1": (v1, False), "v2": (v2, False), "v2 + probe": (v2, True), "acc+loss only": (v2, None)}
    times: dict[str, list[float]] = {k: [] for k in engines}

    def run(name):
        accumulator, probe = engines[name]
        measure_module.TapAccumulator = accumulator
        try:
            measure_module.measure(
                model, splits, 10, batch_size=batch_size, collapse=probe is not None, probe=bool(probe)
            )
        finally:
            measure_module.TapAccumulator = v2

    for name in engines:  # warm-up
        run(name)
    for _ in range(repeats):
        for name in engines:
            times[name].append(_time(lambda name=name: run(name)))
    widths = [t[0].numel() for t in model.forward_taps(splits["train"][0][:2])[1].values()]
    return {
        "case": case,
        "taps": ", ".join(str(w) for w in widths),
        "samples": 2 * samples,
        **{k: statistics.median(v) for k, v in times.items()},
    }


def bench_tap(samples: int, dim: int, repeats: int, v1) -> dict:
    """One tap's accumulators alone (both passes and the result, no forward pass), at the metric subset's
    real size: the per-sample cost of the engines, with their fixed per-tap costs spread over it."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(samples) % 10
    h = torch.randn(samples, dim, generator=gen) + torch.randn(10, dim, generator=gen)[y]
    weight = torch.randn(10, dim, generator=gen)

    def run(cls, probe):
        acc = cls(10, dim, probe="fit" if probe else None)
        for lo in range(0, samples, 2048):
            acc.add_pass1(h[lo : lo + 2048], y[lo : lo + 2048])
        acc.end_pass1()
        for lo in range(0, samples, 2048):
            acc.add_pass2(h[lo : lo + 2048], y[lo : lo + 2048])
        acc.result(classifier=weight)

    engines = {"v1": (v1, False), "v2": (measure_module.TapAccumulator, False)}
    engines["v2 + probe"] = (measure_module.TapAccumulator, True)
    times = {k: [] for k in engines}
    for _ in range(repeats):
        for name, (cls, probe) in engines.items():
            times[name].append(_time(lambda cls=cls, probe=probe: run(cls, probe)))
    return {
        "case": f"one {dim:,}-wide tap, accumulators only",
        "taps": str(dim),
        "samples": samples,
        "acc+loss only": float("nan"),
        **{k: statistics.median(v) for k, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: fewer samples and repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--resnet-samples", type=int, default=300)
    parser.add_argument("--cases", default="mlp,resnet,tap", help="comma-separated subset of mlp,resnet,tap")
    parser.add_argument(
        "--base", default=V1_COMMIT, help="the commit in the v1 column (default: the last of version 1)"
    )
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    v1 = load_v1_engine(args.base)
    torch.manual_seed(0)
    cases = set(args.cases.split(","))
    rows = []
    if "mlp" in cases:
        rows.append(bench("seed000-mlp", 500 if args.quick else 10_000, repeats, 2048, v1))
    if "resnet" in cases:
        rows.append(bench("resnet18-28px", 50 if args.quick else args.resnet_samples, repeats, 256, v1))
    if "tap" in cases:
        rows.append(bench_tap(500 if args.quick else 10_000, 50_176, repeats, v1))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, repeats={repeats}, python {sys.version.split()[0]}, "
        f"v1 column: commit {args.base}\n"
    )
    print(
        "| case | tap widths | samples | v1 (s) | v2 (s) | v2 / v1 | v2 + probe (s) | probe / v2 | acc+loss only (s) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['case']} | {r['taps']} | {r['samples']} | {r['v1']:.3f} | {r['v2']:.3f} | "
            f"{r['v2'] / r['v1']:.2f}x | {r['v2 + probe']:.3f} | {r['v2 + probe'] / r['v2']:.2f}x | "
            f"{r['acc+loss only']:.3f} |"
        )


if __name__ == "__main__":
    main()
