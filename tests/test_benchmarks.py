"""The benchmarks run in their CI-sized form: the script works end to end and prints its
tables. Nothing about the times is asserted; the numbers belong in benchmarks/RESULTS.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_speed_benchmark_runs_in_ci_size():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_speed.py"),
            "--quick",
            "--repeats",
            "1",
            "--sections",
            "epoch,metrics,mlflow,throughput,calibration",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in (
        "| trainer epoch",
        "| bundle of 4, per model",
        "| DataLoader loop",
        "metric / epoch",
        "log / epoch",
        "| 2 trials packed (separate processes) | 2 |",
        "| bundle of 2 | 2 |",
        "| GFLOP/s | of GEMM peak |",
        "| seed 000 MLP (28x28, batch 128) | bundle |",
        "| quickstart MLP (digits 8x8, depth 4, width 64, batch 128) | trials per node |",
    ):
        assert row in out, out


@pytest.mark.slow
def test_results_benchmark_runs_in_ci_size():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_results.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Each way of reading ran and read the same rows (the script stops where they differ).
    for way in ("the database directly", "through mlflow server", "get_metric_history per run and key"):
        assert f"| sqlite | load_histories, {way}" in proc.stdout or f"| sqlite | {way}" in proc.stdout
