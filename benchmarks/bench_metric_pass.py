"""The per-epoch NC metric pass of seed 000's MLP: this checkout's engine against an earlier commit's,
side by side in one process (alternating rounds), with the largest difference between their values.

Both engines (``trainables/measure.py`` and ``trainables/metrics.py`` of the commit) measure the same
trained model on the same samples: a 10,000-sample train subset and 10,000 test samples of Fashion-MNIST's
shape, every NC metric of every tap, as ``metrics: {every: 1, max_samples: 10000}`` does each epoch.

Run: ``python benchmarks/bench_metric_pass.py [--base COMMIT] [--repeats N] [--threads T]``. Nothing is
asserted; the numbers belong in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_metric_versions import module_at  # the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]


def engine_at(commit: str):
    """``measure_stack``'s module of ``commit`` with that commit's metrics module under it."""
    tag = commit[:8]
    module_at(commit, "trainables/metrics.py", f"metrics_{tag}")
    return module_at(
        commit,
        "trainables/measure.py",
        f"measure_{tag}",
        edit=lambda source: source.replace("from trainables.metrics import", f"from metrics_{tag} import"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="cb5f618", help="the commit to compare with")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from trainables import measure as current
    from trainables.calibrate import synthetic_splits
    from trainables.config import TrialConfig
    from trainables.data import Splits
    from trainables.loop import Trainer

    cfg = TrialConfig.model_validate(
        {
            "dataset": "fashion_mnist",
            "model": {"mlp": {"preset": "seed000"}},
            "metrics": {"max_samples": 10_000},
        }
    )
    train = synthetic_splits(cfg, 20_000)
    gen = torch.Generator().manual_seed(1)
    data = Splits(
        train.x_train,
        train.y_train,
        torch.randn(10_000, 1, 28, 28, generator=gen),
        train.y_train[:10_000],
        10,
    )
    trainer = Trainer(cfg, data=data)
    trainer.train_epoch()  # trained features, not initial ones
    model = trainer.model.eval()
    engines = {"base": engine_at(args.base), "this checkout": current}

    def run(engine):
        return engine.measure(model, trainer.splits, 10, batch_size=cfg.metrics.batch_size, collapse=True)

    values = {name: run(engine) for name, engine in engines.items()}  # warm-up, and the values compared
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            started = time.perf_counter()
            run(engine)
            times[name].append(time.perf_counter() - started)
    base, new = values["base"], values["this checkout"]
    assert set(base) == set(new), set(base) ^ set(new)
    rel = max(abs(new[k] - base[k]) / max(abs(base[k]), 1e-300) for k in base if math.isfinite(base[k]))
    epoch = statistics.median(
        [
            (lambda t0: (trainer.model.train(), trainer.train_epoch(), time.perf_counter() - t0)[-1])(
                time.perf_counter()
            )
            for _ in range(3)
        ]
    )
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}; seed 000 MLP, {len(trainer.splits['train'][1]):,} + "
        f"{len(trainer.splits['test'][1]):,} samples, {len(new)} keys; medians of {args.repeats}, alternating\n"
    )
    print("| engine | metric pass (s) | vs base | / 20k-sample train epoch |\n| --- | ---: | ---: | ---: |")
    b = statistics.median(times["base"])
    for name, t in times.items():
        t = statistics.median(t)
        label = f"{name} ({args.base})" if name == "base" else name
        print(f"| {label} | {t:.3f} | {t / b:.2f}x | {t / epoch:.1%} |")
    print(f"\nlargest relative difference between the engines' {len(new)} values: {rel:.1e}")


if __name__ == "__main__":
    main()
