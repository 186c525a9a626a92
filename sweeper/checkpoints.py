"""Trial checkpoints the sweeper owns: one file per Tune trial, ``<sweep dir>/checkpoints/<trial key>.pt``.

Why not Tune's checkpoints: with ``CheckpointConfig(num_to_keep=k)`` Tune deletes old checkpoints while
the experiment snapshot on storage may still name one of them, and a restore from that snapshot then fails
on every retry (seen in 3 of 15 SIGKILLed quickstart runs with Ray 2.60). Here nothing records which
checkpoint to read: a trial reads the one file under its key, which is replaced whole (temp file + rename,
or one object PUT) only after the new state is complete, so at every instant it holds the newest complete
state. Disk: one checkpoint per trial (Tune kept two). MLflow is written before the file, so a checkpoint
never runs ahead of the logged epochs.
"""

from __future__ import annotations

import io
from typing import Any

from sweeper.location import Location, parse_location

CHECKPOINT_DIR = "checkpoints"


class TrialCheckpoint:
    """The checkpoint file of one Tune trial (a lone trial's state, or a bundle's member states by key)."""

    def __init__(self, folder: str, key: str) -> None:
        self.location: Location = parse_location(folder)
        self.name = f"{key}.pt"

    def load(self) -> dict[str, Any] | None:
        import torch

        if not self.location.exists(self.name):
            return None
        # weights_only: no pickled code runs on load.
        return torch.load(
            io.BytesIO(self.location.read_bytes(self.name)), map_location="cpu", weights_only=True
        )

    def save(self, state: dict[str, Any]) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.location.write_bytes(self.name, buffer.getvalue())


STOP_MARKER = "STOP"
"""``<sweep dir>/checkpoints/STOP``: the driver asks every running trial to checkpoint the epoch it is at
(a wall-time signal, a preemption, Ctrl-C); the next run removes it before any trial starts."""


class StopProbe:
    """A trial's view of the stop marker: looked up at most every ``interval`` seconds (an object store
    answers a HEAD per look), and once seen, seen for good (a checkpoint decision must not flip)."""

    def __init__(self, folder: str | None, interval: float = 2.0) -> None:
        self.location = parse_location(folder) if folder else None
        self.interval = interval
        self.seen = False
        self._next = 0.0

    def __call__(self) -> bool:
        import time

        if self.seen or self.location is None or time.monotonic() < self._next:
            return self.seen
        self._next = time.monotonic() + self.interval
        try:
            self.seen = self.location.exists(STOP_MARKER)
        except OSError:
            pass  # storage away for a moment: asked again next epoch
        return self.seen
