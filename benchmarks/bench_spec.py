"""``validate`` and ``plan`` on large grids, as a user runs them (a fresh process, imports included).

Cases: a 1,000-trial and a 10,000-trial grid of seed 000's MLP (seeds x learning rates x weight decays:
trials that share one model build), and a 10^10-trial grid that must be refused before it is expanded.

Run: ``python benchmarks/bench_spec.py [--quick]``. Prints a Markdown table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = """name: bench-{n}
dataset: gaussian
model: {{mlp: {{preset: seed000}}}}
grid:
  seed: {seeds}
  train.optimizer.lr: {lrs}
  train.optimizer.weight_decay: {decays}
"""


def spec_text(seeds: int, lrs: int, decays: int) -> str:
    return SPEC.format(
        n=seeds * lrs * decays,
        seeds=list(range(seeds)),
        lrs=[round(0.001 * (i + 1), 6) for i in range(lrs)],
        decays=[round(1e-5 * i, 8) for i in range(decays)],
    )


def timed(args: list[str], cwd: Path) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: the 1,000-trial grid only")
    args = parser.parse_args()
    cases = [
        ("1,000 trials", (10, 10, 10)),
        ("10,000 trials", (100, 10, 10)),
        ("10^10 trials", (10**4, 10**3, 10**3)),
    ]
    if args.quick:
        cases = [cases[0], cases[2]]
    folder = Path(tempfile.mkdtemp())
    print(f"python {sys.version.split()[0]}, {platform.processor() or platform.machine()}\n")
    print("| grid | validate (s) | plan (s) | exit | last line of stderr |")
    print("| --- | ---: | ---: | ---: | --- |")
    for label, shape in cases:
        path = folder / f"{label.split()[0]}.yaml"
        path.write_text(spec_text(*shape))
        v, code, err = timed([sys.executable, "-m", "sweeper", "validate", str(path)], folder)
        p, _, _ = timed([sys.executable, "-m", "sweeper", "plan", str(path)], folder)
        print(f"| {label} | {v:.1f} | {p:.1f} | {code} | {err[:90]} |")


if __name__ == "__main__":
    main()
