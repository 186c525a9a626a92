"""Where a sweep directory lives: a local or shared path, or an object-store URI.

A location is a pyarrow filesystem plus a path on it, the pair Ray Tune takes as ``storage_path`` and
``storage_filesystem`` (on several nodes it must be a path every node reaches). The driver reads and
writes the sweep's own files (``spec.yaml``,
``sweep.json``) through the same filesystem, so ``s3://bucket/sweeps?endpoint_override=host:9000&scheme=http``
works everywhere a directory does. Credentials come from the usual environment (``AWS_*``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trainables.checkpoint import write_atomically

# Forwarded to Ray workers so they can write checkpoints to the same store (workers do not inherit the
# driver's environment). On a cluster, workers' own credentials work just as well.
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


class LocationError(ValueError):
    """A storage location that cannot be opened (unknown scheme, unreachable store)."""


@dataclass(frozen=True)
class Location:
    """A directory on some filesystem; ``uri`` is what the user wrote (or the resolved local path)."""

    uri: str
    fs: object  # pyarrow.fs.FileSystem (imported lazily: pyarrow is heavy for `validate`)
    path: str

    @property
    def is_local(self) -> bool:
        import pyarrow.fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path | None:
        return Path(self.path) if self.is_local else None

    @property
    def parent(self) -> Location:
        return self._with_path(self.path.rstrip("/").rsplit("/", 1)[0] or "/")

    def child(self, name: str) -> Location:
        return self._with_path(f"{self.path.rstrip('/')}/{name}")

    def _with_path(self, path: str) -> Location:
        if self.is_local:
            return Location(path, self.fs, path)
        base, _, query = self.uri.partition("?")
        scheme = base.split("://", 1)[0]
        return Location(f"{scheme}://{path}" + (f"?{query}" if query else ""), self.fs, path)

    def exists(self, name: str) -> bool:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(f"{self.path}/{name}")
        return info.type != pafs.FileType.NotFound

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(f"{self.path}/{name}") as f:
            return f.read()

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write whole or not at all: a local temp file (synced to disk) renamed into place, so a reader sees
        the old or the new file even when the writer is killed mid-write; an object PUT is atomic."""
        target = f"{self.path}/{name}"
        if self.is_local:
            write_atomically(target, lambda f: f.write(data))
        else:
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def remove(self, name: str) -> None:
        self.fs.delete_file(f"{self.path}/{name}")

    def __str__(self) -> str:
        return self.uri


def parse_location(text: str | os.PathLike) -> Location:
    """A path (made absolute) or a URI pyarrow can open (``s3://``, ``gs://``, ``hdfs://``, ``file://``)."""
    import pyarrow.fs as pafs

    text = str(text)
    if "://" not in text:
        path = str(Path(text).expanduser().resolve())
        return Location(path, pafs.LocalFileSystem(), path)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as err:  # pyarrow raises ArrowInvalid/ArrowNotImplementedError/OSError
        raise LocationError(f"cannot open storage '{text}': {err}") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return Location(path, fs, path)
    return Location(text, fs, path.rstrip("/"))


def credential_env() -> dict[str, str]:
    return {k: os.environ[k] for k in CREDENTIAL_VARS if os.environ.get(k)}
