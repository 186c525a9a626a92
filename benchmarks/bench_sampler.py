"""Optuna sampler overhead per trial (ask + tell) with the SVSL space, on SQLite storage like a sweep's.

Run: ``python benchmarks/bench_sampler.py [--trials N]``. Prints a Markdown table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from sweeper.search import make_distribution, make_sampler

SPACE = {"svsl.alpha": {"loguniform": [5.0e-8, 5.0e-5]}, "svsl.gamma": {"int": [1, 4]}}


def bench(sampler: str, trials: int, storage: str) -> tuple[float, float, float]:
    study = optuna.create_study(
        study_name=sampler, storage=storage, sampler=make_sampler(sampler, 0), direction="maximize"
    )
    dists = {k: make_distribution(v) for k, v in SPACE.items()}
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        trial = study.ask(dists)
        study.tell(trial, -abs(trial.params["svsl.alpha"] - 1e-5) - 0.01 * trial.params["svsl.gamma"])
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:]), max(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{Path(tmp) / 'optuna.db'}"
        print(f"optuna {optuna.__version__}, {args.trials} trials per study, SQLite storage\n")
        print("| sampler | first ask+tell (s) | median ask+tell (s) | max (s) |")
        print("| --- | ---: | ---: | ---: |")
        for sampler in ("random", "tpe", "gp"):
            first, median, worst = bench(sampler, args.trials, storage)
            print(f"| {sampler} | {first:.3f} | {median:.3f} | {worst:.3f} |")


if __name__ == "__main__":
    main()
