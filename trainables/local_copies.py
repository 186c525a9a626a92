"""Local copies of torchvision datasets: imported into a data root, verified by their decompressed content.

Our machines cannot download, but a copy may already be on disk: Debian's ``dataset-fashion-mnist``
installs Fashion-MNIST's four IDX files under ``/usr/share/datasets/fashion-mnist``. Its ``.gz`` files
are recompressed, so torchvision's md5 check of the published archives rejects them although the
decompressed bytes are the published ones. :func:`import_local_copy` therefore checks what torchvision
actually reads, the decompressed files: their sizes, IDX headers, sample and label counts and, where
recorded here, their SHA-256. Everything is verified in memory before anything is written, then written
to a temporary folder under the root and moved into place file by file, so a wrong or truncated copy
leaves nothing under the root.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class LocalCopyError(ValueError):
    """A local copy that is incomplete or not the published data (the message names the file)."""


@dataclass(frozen=True)
class IdxFile:
    name: str
    shape: tuple[int, ...]  # without the sample axis
    samples: int
    sha256: str | None  # of the decompressed file; None where no reference value is recorded here
    per_class: int | None = None  # labels: every class has this many samples (balanced datasets)

    @property
    def size(self) -> int:
        return 8 + 4 * len(self.shape) + self.samples * int(np.prod(self.shape, dtype=np.int64))


# SHA-256 of the decompressed IDX files of Zalando's Fashion-MNIST (github.com/zalandoresearch/fashion-mnist,
# the files torchvision downloads), computed from Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1;
# the sizes, headers and per-class counts are those of the dataset's README (Xiao et al. 2017,
# arXiv:1708.07747): 60,000 training and 10,000 test images, 6,000 and 1,000 per class.
FASHION_MNIST = (
    IdxFile(
        "train-images-idx3-ubyte",
        (28, 28),
        60_000,
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    IdxFile(
        "train-labels-idx1-ubyte",
        (),
        60_000,
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        6_000,
    ),
    IdxFile(
        "t10k-images-idx3-ubyte",
        (28, 28),
        10_000,
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    IdxFile(
        "t10k-labels-idx1-ubyte",
        (),
        10_000,
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        1_000,
    ),
)
# MNIST (LeCun et al. 1998) has the same layout; no copy of it was at hand to record its hashes, so a copy
# is checked by sizes, headers and counts only (its classes are not balanced).
MNIST = (
    IdxFile("train-images-idx3-ubyte", (28, 28), 60_000, None),
    IdxFile("train-labels-idx1-ubyte", (), 60_000, None),
    IdxFile("t10k-images-idx3-ubyte", (28, 28), 10_000, None),
    IdxFile("t10k-labels-idx1-ubyte", (), 10_000, None),
)
LAYOUTS = {"fashion_mnist": ("FashionMNIST/raw", FASHION_MNIST), "mnist": ("MNIST/raw", MNIST)}
"""Datasets a local copy can be imported for: the folder torchvision reads under the root, the files."""

KNOWN_COPIES = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
"""Where a package puts a copy: Debian's ``dataset-fashion-mnist``."""


def known_copy(name: str) -> Path | None:
    """The packaged copy of ``name`` on this machine, if there is one."""
    path = KNOWN_COPIES.get(name)
    return path if path is not None and path.is_dir() else None


def _read(source: Path, spec: IdxFile) -> tuple[Path, bytes]:
    """The decompressed bytes of ``spec`` in ``source`` (plain, or ``.gz``; also torchvision's layout)."""
    candidates = [source / spec.name, source / f"{spec.name}.gz"]
    for layout, _ in LAYOUTS.values():
        candidates += [source / layout / spec.name, source / layout / f"{spec.name}.gz"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise LocalCopyError(f"{source}: {spec.name} not found (looked for {spec.name} and {spec.name}.gz)")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise LocalCopyError(f"{path}: not a complete gzip file ({err})") from None
    return path, data


def _verify(path: Path, data: bytes, spec: IdxFile) -> None:
    if len(data) != spec.size:
        raise LocalCopyError(
            f"{path}: {len(data):,} bytes decompressed, expected {spec.size:,} "
            f"({spec.samples:,} samples of {'x'.join(map(str, spec.shape)) or 'one label'})"
        )
    magic = int.from_bytes(data[:4], "big")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(1 + len(spec.shape))]
    expected_magic = 0x0800 + 1 + len(spec.shape)  # unsigned bytes, then the number of dimensions
    if magic != expected_magic or dims != [spec.samples, *spec.shape]:
        raise LocalCopyError(
            f"{path}: IDX header {magic:#010x} {dims}, expected {expected_magic:#010x} "
            f"{[spec.samples, *spec.shape]}"
        )
    if not spec.shape:  # labels
        labels = np.frombuffer(data, dtype=np.uint8, offset=8)
        counts = np.bincount(labels, minlength=10)
        if labels.max() > 9:
            raise LocalCopyError(f"{path}: labels must lie in 0..9, found {int(labels.max())}")
        if spec.per_class is not None and not (counts == spec.per_class).all():
            raise LocalCopyError(
                f"{path}: {spec.per_class:,} samples per class expected, got {counts.tolist()}"
            )
    if spec.sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != spec.sha256:
            raise LocalCopyError(
                f"{path}: decompressed content has SHA-256 {digest}, expected {spec.sha256} "
                "(the published file)"
            )


def import_local_copy(name: str, source: Path, root: Path) -> Path:
    """Verify the local copy of ``name`` in ``source`` and install it under ``root`` in the layout
    torchvision reads; return the folder written. Raises :class:`LocalCopyError`, writing nothing."""
    if name not in LAYOUTS:
        raise LocalCopyError(
            f"data prepare --from supports {', '.join(LAYOUTS)}; for {name}, stage it with "
            f"`python -m sweeper data prepare {name} --root DIR` on a machine with internet"
        )
    if not source.is_dir():
        raise LocalCopyError(f"{source}: no such folder")
    layout, files = LAYOUTS[name]
    verified = []
    for spec in files:
        path, data = _read(source, spec)
        _verify(path, data, spec)
        verified.append((spec.name, data))
    target = root / layout
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=root))
    try:
        for filename, data in verified:
            (staging / filename).write_bytes(data)
        target.mkdir(parents=True, exist_ok=True)
        for filename, _ in verified:
            os.replace(staging / filename, target / filename)  # atomic per file: never half a file
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
