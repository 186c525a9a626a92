"""Checkpoint files: written atomically, read with ``weights_only=True`` (no pickled code runs on load)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

STATE_FILE = "trial_state.pt"
STATE_NAME = Path(STATE_FILE).stem
"""A lone trial's state in a sweep's checkpoint file, which holds states by name (a bundle's by member key)."""


class CheckpointUnreadable(ValueError):
    """A file given as a checkpoint that holds no trial state this project can continue from."""


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Have ``write`` fill a temporary file beside ``path`` (synced to disk), then rename it into place: a
    reader sees the old or the new file, never half of one, even when the writer is killed mid-write. The
    file gets the umask's mode (mkstemp's would be private, 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_state(state: dict[str, Any], path: str | Path) -> None:
    import torch

    write_atomically(path, lambda f: torch.save(state, f))


def load_state(path: str | Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def load_trial_state(path: str | Path, *, sweeps_too: bool = True) -> dict[str, Any]:
    """One trial's state from ``path``: a state ``python -m trainables`` saved, or (``sweeps_too``) a
    sweep's checkpoint of a lone trial (``<sweep dir>/checkpoints/<key>.pt``, the state under
    :data:`STATE_NAME`). Anything else raises :class:`CheckpointUnreadable` saying what the file is."""
    try:
        saved = load_state(path)
    except Exception as err:  # torch raises pickle, zip, EOF and index errors on files it did not write
        raise CheckpointUnreadable(
            f"not a checkpoint: torch cannot read it ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(saved, dict):
        raise CheckpointUnreadable(f"not a trial checkpoint: it holds a {type(saved).__name__}")
    if "model" in saved and "epoch" in saved:
        return saved
    states = {name: state for name, state in saved.items() if isinstance(state, dict) and "model" in state}
    if not states or len(states) != len(saved):
        raise CheckpointUnreadable(f"not a trial checkpoint: it holds {', '.join(map(str, list(saved)[:5]))}")
    if set(states) != {STATE_NAME}:
        raise CheckpointUnreadable(
            f"a sweep's checkpoint of a bundle of {len(states)} trials ({', '.join(sorted(states))}), "
            "trained as one stacked model; `sweeper resume <sweep>` continues it"
        )
    if not sweeps_too:
        raise SweepCheckpoint(f"a sweep's checkpoint (epoch {states[STATE_NAME]['epoch']})")
    return states[STATE_NAME]


class SweepCheckpoint(CheckpointUnreadable):
    """A sweep's checkpoint where a file to write was asked for: the sweep writes it, after logging the
    epochs it holds to MLflow, and a state written by anything else would run ahead of MLflow's."""
