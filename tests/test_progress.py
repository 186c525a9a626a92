"""The live progress display of `run`: a tqdm bar redrawn in place in a real pseudo-terminal (util-linux
`script`), plain periodic lines when stderr is not a terminal; both carry each running trial's epoch k/N
and objective, the counts, the best value so far and an ETA."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.services import mlflow_uri

pytestmark = pytest.mark.slow

SPEC = """
name: progress
experiment: progress
dataset: gaussian
data: {gaussian: {classes: 3, dim: 6, train_per_class: 400, test_per_class: 100}}
model: {mlp: {depth: 3, width: 64}}
train: {epochs: 40, batch_size: 16}
metrics: {every: 1}
checkpoint: {every: 20}
grid:
  seed: [0, 1, 2]
resources: {cpu: 1}
"""
RUNNING = re.compile(r"seed=\d (\d+)/40 0\.\d{4}")


def _env(tmp_path, **extra):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri(tmp_path), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def test_progress_redraws_in_a_terminal(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    command = shlex.join(
        [sys.executable, "-m", "sweeper", "run", "spec.yaml", "--storage", str(tmp_path / "s")]
    )
    proc = subprocess.run(
        ["script", "-qfec", command, "/dev/null"],
        cwd=tmp_path,
        # A terminal 200 columns wide (tqdm cuts the line at the terminal's width; under pytest the
        # width it inherits varies).
        env=_env(tmp_path, COLUMNS="200", LINES="50"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout  # the pseudo-terminal's output: stdout and stderr together
    # tqdm redraws its line in place: several frames, with the running trials' epochs.
    assert out.count("%|") >= 3, out[-3000:]
    assert RUNNING.search(out), out[-3000:]
    assert re.search(r"\d+/120 \[", out)  # the bar counts the sweep's epochs: 3 trials x 40
    assert re.search(r"\d+ finished, 0 failed, \d+ running, \d+ pending; best test_acc 0\.\d{4}", out), out[
        -3000:
    ]
    assert "3 finished, 0 failed" in out
    assert out.count("finished seed=") == 3  # one line per finished trial, above the bar


def test_progress_prints_plain_lines_without_a_terminal(tmp_path):
    (tmp_path / "spec.yaml").write_text(SPEC)
    proc = subprocess.run(
        [sys.executable, "-m", "sweeper", "run", "spec.yaml", "--storage", str(tmp_path / "s")],
        cwd=tmp_path,
        env=_env(tmp_path, SWEEPER_PROGRESS_SECONDS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if re.match(r"\[\d+(m\d\ds)?s?\] \d+ finished", line)]
    assert len(lines) >= 2, proc.stderr[-3000:]
    assert "\r" not in proc.stderr  # no redraws in a log
    assert any(RUNNING.search(line) and "ETA " in line for line in lines), lines
    assert proc.stderr.count("finished seed=") == 3
