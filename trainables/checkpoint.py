"""Checkpoint files: written atomically, read with ``weights_only=True`` (no pickled code runs on load)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trial_state.pt"


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same directory, then rename: a reader sees the old or the new file,
    never half of one, even when the process is killed mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
