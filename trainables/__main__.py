"""Run one trial without Ray or MLflow: ``python -m trainables TRIAL.yaml [--checkpoint PATH] [--from PATH]
[--set k=v]``.

Prints one JSON object per epoch and a final ``{"summary": ...}`` line. With ``--checkpoint`` the state is
saved there on checkpoint epochs and, when the file exists, the trial continues from it. ``--from`` reads a
state once, never writing it, when ``--checkpoint`` does not exist yet: a sweep's checkpoint of a trial
(``<sweep dir>/checkpoints/<key>.pt``) continues here without touching the sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from trainables.checkpoint import CheckpointUnreadable, SweepCheckpoint, load_trial_state, save_state
from trainables.config import TrialConfig, set_path
from trainables.loop import CheckpointMismatch, train


class PrintReporter:
    def __init__(self, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint

    def report(self, epoch: int, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if state is not None and self.checkpoint is not None:
            save_state(state, self.checkpoint)
        print(json.dumps({"epoch": epoch, **metrics}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainables",
        description="Run one trial without Ray or MLflow; one JSON line per epoch, then a summary line.",
    )
    parser.add_argument("trial", type=Path, help="YAML or JSON file of one trial config")
    parser.add_argument("--checkpoint", type=Path, help="state file to save to and continue from")
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="state to start from when --checkpoint does not exist yet (read only: a sweep's checkpoint too)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    try:
        data = yaml.safe_load(args.trial.read_text()) or {}
        for item in args.set:
            key, _, value = item.partition("=")
            set_path(data, key, yaml.safe_load(value))
        cfg = TrialConfig.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError, AttributeError) as err:
        print(f"error: {args.trial}: {err}", file=sys.stderr)
        return 2
    source = args.checkpoint if args.checkpoint and args.checkpoint.exists() else args.source
    try:
        state = None if source is None else load_trial_state(source, sweeps_too=source != args.checkpoint)
        summary = train(cfg, PrintReporter(args.checkpoint), state)
    except SweepCheckpoint as err:
        print(
            f"error: {source}: {err}; the sweep writes it (`sweeper resume` continues the trial there). "
            f"To continue it here, read it with --from {source} and save to a new --checkpoint file",
            file=sys.stderr,
        )
        return 2
    except (CheckpointUnreadable, CheckpointMismatch) as err:
        print(f"error: {source}: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
