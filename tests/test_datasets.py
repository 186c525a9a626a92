"""torchvision's loaders on small files the test writes in their real on-disk format, and the message
for a dataset that is absent and cannot be downloaded."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from trainables.config import TrialConfig
from trainables.data import DatasetUnavailable, load_splits

IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx(folder, train: bool, images: np.ndarray, labels: np.ndarray) -> None:
    """The IDX format of LeCun's MNIST files: big-endian magic, dimensions, then uint8 data."""
    folder.mkdir(parents=True, exist_ok=True)
    img_name, lbl_name = IDX_FILES[train]
    n, rows, cols = images.shape
    (folder / img_name).write_bytes(
        struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()
    )
    (folder / lbl_name).write_bytes(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_reads_idx_files(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, size=(50, 28, 28))
    train_y = np.arange(50) % 10
    test_x = rng.integers(0, 256, size=(20, 28, 28))
    test_y = (np.arange(20) * 3) % 10
    write_idx(tmp_path / folder / "raw", True, train_x, train_y)
    write_idx(tmp_path / folder / "raw", False, test_x, test_y)
    cfg = TrialConfig.model_validate({"dataset": name, "data": {"root": str(tmp_path), "download": False}})
    splits = load_splits(cfg)
    assert tuple(splits.x_train.shape) == (50, 1, 28, 28) and tuple(splits.x_test.shape) == (20, 1, 28, 28)
    assert splits.y_train.tolist() == train_y.tolist() and splits.y_test.tolist() == test_y.tolist()
    # Normalised by the train split's pixel mean and std: the raw pixels come back exactly.
    mean, std = train_x.mean(), train_x.std()
    assert np.allclose(splits.x_test.numpy()[:, 0] * std + mean, test_x, atol=1e-3)

    subset = load_splits(cfg.model_copy(update={"data": cfg.data.model_copy(update={"train_per_class": 2})}))
    assert np.bincount(subset.y_train.numpy()).tolist() == [2] * 10


def test_absent_dataset_message_says_where_and_how_to_stage(tmp_path):
    cfg = TrialConfig.model_validate(
        {"dataset": "cifar10", "data": {"root": str(tmp_path), "download": False}}
    )
    with pytest.raises(DatasetUnavailable) as err:
        load_splits(cfg)
    message = str(err.value)
    assert f"not found under {tmp_path}" in message
    assert f"{tmp_path}/cifar-10-batches-py" in message
    assert "python -m sweeper data prepare cifar10 --root DIR" in message
    assert "\n" not in message


def test_data_root_falls_back_to_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPER_DATA", str(tmp_path / "env-root"))
    cfg = TrialConfig.model_validate({"dataset": "svhn", "data": {"download": False}})
    with pytest.raises(DatasetUnavailable, match=f"not found under {tmp_path / 'env-root'}"):
        load_splits(cfg)


def test_describe_splits_names_the_source_and_digests_the_content():
    from trainables.data import describe_splits, load_splits

    cfg = TrialConfig.model_validate({"dataset": "digits"})
    splits = load_splits(cfg)
    info = describe_splits(cfg, splits)
    assert info["name"] == "digits" and info["source"] == "scikit-learn's load_digits"
    assert (info["train"], info["test"], info["classes"], info["input_shape"]) == (
        len(splits.y_train),
        len(splits.y_test),
        10,
        [1, 8, 8],
    )
    assert describe_splits(cfg, load_splits(cfg))["digest"] == info["digest"]  # stable
    splits.x_train[0, 0, 0, 0] += 1.0
    assert describe_splits(cfg, splits)["digest"] != info["digest"]  # and it is the content's
