"""Checkpoint files: written atomically, read with ``weights_only=True`` (no pickled code runs on load)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

STATE_FILE = "trial_state.pt"


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
