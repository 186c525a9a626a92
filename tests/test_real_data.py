"""Real Fashion-MNIST, from Debian's ``dataset-fashion-mnist``: imported, verified, and trained on.

Skipped, saying how to install it, where the package is absent (``.ci/run`` installs it when it can).
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables.config import TrialConfig
from trainables.data import DatasetUnavailable, Splits, load_splits, torchvision_split
from trainables.local_copies import KNOWN_COPIES, LocalCopyError, import_local_copy, known_copy
from trainables.loop import Trainer

PACKAGE = KNOWN_COPIES["fashion_mnist"]
needs_package = pytest.mark.skipif(
    known_copy("fashion_mnist") is None,
    reason=f"needs real Fashion-MNIST at {PACKAGE}: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    if known_copy("fashion_mnist") is None:
        pytest.skip(f"needs real Fashion-MNIST at {PACKAGE}: apt-get install dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("data")
    import_local_copy("fashion_mnist", PACKAGE, root)
    return root


def _prepare(source: Path, root: Path) -> subprocess.CompletedProcess:
    """``sweeper data prepare fashion_mnist --from SOURCE --root ROOT`` as a user runs it."""
    command = ["data", "prepare", "fashion_mnist", "--from", str(source), "--root", str(root)]
    return subprocess.run(
        [sys.executable, "-m", "sweeper", *command], capture_output=True, text=True, timeout=300
    )


@needs_package
def test_prepare_from_the_package_on_the_command_line(tmp_path):
    root = tmp_path / "root"
    proc = _prepare(PACKAGE, root)
    assert proc.returncode == 0, proc.stderr
    assert "fashion_mnist train: 60000 samples" in proc.stdout
    assert "fashion_mnist test: 10000 samples" in proc.stdout
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]


def _damaged_copy(tmp_path: Path, damage: str) -> tuple[Path, str]:
    copy = tmp_path / "copy"
    shutil.copytree(PACKAGE, copy)
    target = copy / "t10k-images-idx3-ubyte.gz"
    if damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        return copy, "t10k-images-idx3-ubyte.gz: not a complete gzip file"
    if damage == "one pixel changed":
        changed = bytearray(gzip.decompress(target.read_bytes()))
        changed[5000] ^= 0xFF
        target.write_bytes(gzip.compress(bytes(changed)))
        return copy, "t10k-images-idx3-ubyte.gz: decompressed content has SHA-256"
    target.unlink()
    return copy, "t10k-images-idx3-ubyte not found"


@needs_package
@pytest.mark.parametrize("damage", ["truncated", "missing file"])
def test_a_damaged_copy_is_refused_naming_the_file_and_nothing_is_written(tmp_path, damage):
    copy, expected = _damaged_copy(tmp_path, damage)
    with pytest.raises(LocalCopyError, match=expected):
        import_local_copy("fashion_mnist", copy, tmp_path / "root")
    assert not (tmp_path / "root").exists()


@needs_package
def test_a_changed_pixel_fails_on_the_command_line_with_one_line_and_exit_2(tmp_path):
    copy, expected = _damaged_copy(tmp_path, "one pixel changed")
    root = tmp_path / "root"
    root.mkdir()  # an existing root keeps only what it had
    proc = _prepare(copy, root)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data prepare: ") and expected in lines[0], lines
    assert list(root.iterdir()) == []


def test_a_wrong_size_names_what_was_expected(tmp_path):
    """Without the package too: a copy whose labels file is short says how long it must be."""
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (60_000).to_bytes(4, "big"))
    with pytest.raises(LocalCopyError, match=r"train-images-idx3-ubyte not found"):
        import_local_copy("fashion_mnist", tmp_path, tmp_path / "root")
    from trainables.local_copies import FASHION_MNIST, _verify

    with pytest.raises(LocalCopyError, match=r"8 bytes decompressed, expected 60,008 \(60,000 samples"):
        _verify(tmp_path / "x", b"\x00\x00\x08\x01" + (60_000).to_bytes(4, "big"), FASHION_MNIST[1])
    assert not (tmp_path / "root").exists()


@needs_package
def test_run_without_the_data_names_the_prepare_command(tmp_path):
    with pytest.raises(DatasetUnavailable) as err:
        torchvision_split("fashion_mnist", tmp_path, True, download=False)
    assert f"python -m sweeper data prepare fashion_mnist --from {PACKAGE} --root {tmp_path}" in str(
        err.value
    )


def test_the_real_splits_are_the_published_ones(fmnist_root):
    """60,000 / 10,000 samples, 6,000 / 1,000 per class; train pixels (0-1 scale) have mean 0.2860 and std
    0.3530 (the values every Fashion-MNIST pipeline normalises with); after the trial's normalisation the
    train split is ~0 and ~1."""
    x, y = torchvision_split("fashion_mnist", fmnist_root, True, download=False)
    xt, yt = torchvision_split("fashion_mnist", fmnist_root, False, download=False)
    assert x.shape == (60_000, 1, 28, 28) and xt.shape == (10_000, 1, 28, 28)
    assert np.bincount(y).tolist() == [6_000] * 10 and np.bincount(yt).tolist() == [1_000] * 10
    pixels = x.astype(np.float64) / 255
    assert pixels.mean() == pytest.approx(0.2860, abs=5e-5)
    assert pixels.std() == pytest.approx(0.3530, abs=5e-5)
    cfg = TrialConfig.model_validate({"dataset": "fashion_mnist", "data": {"root": str(fmnist_root)}})
    splits = load_splits(cfg)
    assert float(splits.x_train.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(splits.x_train.std()) == pytest.approx(1.0, abs=1e-4)
    assert float(splits.x_test.mean()) == pytest.approx(0.0, abs=0.02)  # test: the train statistics


PASS = 0.84
"""Test accuracy two epochs of a right pipeline reach."""


def _train(cfg: TrialConfig, data: Splits) -> float:
    trainer = Trainer(cfg, data=data)
    for _ in range(cfg.train.epochs):
        trainer.train_epoch()
    trainer.model.eval()
    with torch.no_grad():
        return float((trainer.model(data.x_test).argmax(1) == data.y_test).float().mean())


def test_seed000_mlp_learns_real_fashion_mnist_and_a_broken_pipeline_does_not(fmnist_root):
    """Two epochs of seed 000's MLP and optimizer on the full data reach PASS test accuracy (the paper's
    89.58% is after 300); the same run with shuffled train labels, or with the test split left
    unnormalised (raw 0-255 pixels against a standardised train split), does not."""
    cfg = TrialConfig.model_validate(
        {
            "dataset": "fashion_mnist",
            "data": {"root": str(fmnist_root)},
            "model": {"mlp": {"preset": "seed000"}},
            "train": {
                "epochs": 2,
                "batch_size": 128,
                "optimizer": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
            },
            "metrics": {"every": 100},
        }
    )
    data = load_splits(cfg)
    right = _train(cfg, data)
    assert right >= PASS, right
    gen = torch.Generator().manual_seed(0)
    shuffled = Splits(
        data.x_train,
        data.y_train[torch.randperm(len(data.y_train), generator=gen)],
        data.x_test,
        data.y_test,
        10,
    )
    x_raw, _ = torchvision_split("fashion_mnist", fmnist_root, False, download=False)
    unnormalised = Splits(
        data.x_train, data.y_train, torch.from_numpy(x_raw.astype(np.float32)), data.y_test, 10
    )
    # Measured here: right 0.87, shuffled labels about 0.1, unnormalised test split 0.71.
    assert _train(cfg, shuffled) < PASS
    assert _train(cfg, unnormalised) < PASS
